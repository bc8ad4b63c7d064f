"""Numba kernels for llama.cpp's 1-bit grid I-quants, IQ1_S and IQ1_M, with importance weights (IQ1_M also without).

Both mirror the scalar C of ``ggml/src/ggml-quants.c`` (llama.cpp as vendored in llama-cpp-python 0.3.36):
``quantize_iq1_s`` over ``quantize_row_iq1_s_impl`` (32-weight blocks) and ``quantize_iq1_m`` over
``quantize_row_iq1_m_impl`` (16-weight blocks), with the tables of ``iq2xs_init_impl`` for the 2048-point grid
``kgrid_1bit_2048``: each group of 8 weights is one grid point whose coordinates are -1, 0 or 1, stored as an 11-bit
index, and each block (IQ1_M: each half block) shifts its levels by +-0.125 (``IQ1S_DELTA``).

The search of a block is exhaustive: the weights sorted ascending (C's ``qsort``: glibc's merge sort, stable for
these sizes: equal values keep their order, which decides ties such as constant blocks; a llama.cpp built on a C
library whose qsort is not stable may differ there), every split into the three levels
``x_p = (-0.875, 0.125, 1.125)`` or ``x_m = (-1.125, -0.125, 0.875)`` (IQ1_M: each half block its own) is scored
by the weighted least-squares scale from prefix sums, the best kept (the first of equal scores). A group of 8 levels
that is not a grid point takes the nearest of its precomputed neighbours (``iq1_find_best_neighbour2``: the grid
points at the 3 smallest distances, the first of equal weighted distances), and the scale is refitted. The 3-bit
block scales are relative to the super-block's ``max / 15``; IQ1_M then refits that scale over the whole super-block.

As in :mod:`releaser.gguf.kquants`, every float operation is float32 in C's order (sums sequential, no fused
multiply-add), and ``nearest_int`` is ggml's.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from numba import njit, prange

from .iqgrid import grid_tables
from .iquants3 import F05, F15, FLT_MAX, _sigma2
from .kquants import F0, F1, nearest_int

# llama.cpp's 1-bit grid (iq2xs_init_impl's kgrid_1bit_2048): each point's 8 levels l (0..2), 2 bits each
KGRID_1BIT_2048 = (
    0, 2, 5, 8, 10, 17, 21, 32, 34, 40, 42, 69, 81, 84, 86, 101,
    128, 130, 136, 138, 149, 160, 162, 168, 170, 260, 261, 273, 276, 278, 281, 282,
    293, 321, 326, 329, 338, 341, 346, 353, 356, 358, 360, 389, 401, 404, 406, 421,
    512, 514, 520, 522, 533, 544, 546, 552, 554, 581, 593, 601, 612, 617, 640, 642,
    648, 650, 657, 661, 665, 672, 674, 680, 682, 1041, 1044, 1046, 1061, 1089, 1097, 1109,
    1114, 1124, 1125, 1169, 1177, 1189, 1281, 1284, 1285, 1286, 1301, 1304, 1306, 1321, 1344, 1349,
    1354, 1360, 1361, 1364, 1365, 1366, 1369, 1376, 1378, 1381, 1384, 1386, 1409, 1425, 1429, 1432,
    1434, 1441, 1444, 1445, 1446, 1449, 1556, 1561, 1601, 1604, 1616, 1618, 1621, 1624, 1632, 1633,
    1638, 1641, 1669, 1681, 1684, 1689, 2048, 2050, 2056, 2058, 2069, 2080, 2082, 2088, 2090, 2117,
    2129, 2134, 2149, 2176, 2178, 2184, 2186, 2197, 2208, 2210, 2216, 2218, 2309, 2321, 2324, 2329,
    2340, 2341, 2369, 2384, 2385, 2389, 2401, 2404, 2409, 2449, 2452, 2454, 2457, 2469, 2560, 2562,
    2568, 2570, 2581, 2592, 2594, 2600, 2602, 2629, 2641, 2649, 2657, 2661, 2688, 2690, 2693, 2696,
    2698, 2709, 2720, 2722, 2728, 2730, 4112, 4113, 4116, 4121, 4132, 4133, 4161, 4164, 4176, 4181,
    4184, 4193, 4196, 4197, 4201, 4241, 4244, 4246, 4257, 4261, 4353, 4356, 4358, 4361, 4368, 4370,
    4373, 4376, 4385, 4388, 4393, 4421, 4426, 4432, 4433, 4434, 4436, 4437, 4438, 4441, 4448, 4453,
    4484, 4498, 4501, 4513, 4516, 4625, 4628, 4630, 4645, 4672, 4678, 4681, 4690, 4693, 4696, 4698,
    4708, 4710, 4741, 4753, 4756, 4758, 4773, 5121, 5126, 5129, 5140, 5141, 5144, 5145, 5153, 5158,
    5185, 5189, 5190, 5192, 5194, 5201, 5204, 5205, 5206, 5209, 5218, 5221, 5224, 5252, 5257, 5264,
    5268, 5269, 5272, 5273, 5274, 5281, 5284, 5285, 5289, 5378, 5381, 5386, 5393, 5396, 5397, 5398,
    5401, 5408, 5410, 5413, 5416, 5418, 5441, 5444, 5445, 5446, 5457, 5458, 5460, 5461, 5462, 5465,
    5466, 5473, 5476, 5477, 5478, 5481, 5504, 5506, 5508, 5509, 5512, 5514, 5520, 5521, 5524, 5525,
    5526, 5529, 5530, 5536, 5538, 5541, 5633, 5636, 5637, 5638, 5653, 5654, 5656, 5658, 5665, 5670,
    5696, 5698, 5700, 5701, 5704, 5706, 5713, 5717, 5718, 5720, 5721, 5729, 5732, 5733, 5736, 5737,
    5738, 5766, 5770, 5778, 5781, 5796, 5801, 6161, 6166, 6181, 6209, 6212, 6214, 6217, 6224, 6229,
    6232, 6234, 6240, 6241, 6244, 6246, 6249, 6277, 6289, 6292, 6309, 6416, 6418, 6421, 6426, 6433,
    6437, 6466, 6468, 6469, 6472, 6481, 6484, 6485, 6486, 6489, 6490, 6496, 6501, 6506, 6537, 6545,
    6546, 6549, 6552, 6561, 6566, 6569, 6665, 6678, 6692, 6694, 6724, 6726, 6729, 6736, 6738, 6741,
    6744, 6753, 6758, 6761, 6789, 6801, 6806, 6810, 8192, 8194, 8200, 8202, 8213, 8224, 8226, 8229,
    8232, 8234, 8261, 8273, 8281, 8289, 8293, 8320, 8322, 8328, 8330, 8341, 8352, 8354, 8357, 8360,
    8362, 8453, 8465, 8468, 8473, 8485, 8514, 8516, 8521, 8533, 8536, 8538, 8545, 8548, 8549, 8550,
    8581, 8592, 8598, 8601, 8613, 8705, 8712, 8714, 8721, 8725, 8736, 8738, 8744, 8746, 8773, 8785,
    8790, 8793, 8805, 8833, 8840, 8842, 8849, 8853, 8864, 8866, 8872, 8874, 9221, 9236, 9238, 9241,
    9253, 9284, 9285, 9286, 9289, 9298, 9301, 9304, 9306, 9318, 9349, 9361, 9364, 9369, 9377, 9381,
    9481, 9493, 9505, 9513, 9536, 9541, 9544, 9553, 9556, 9557, 9561, 9570, 9573, 9576, 9609, 9616,
    9620, 9621, 9624, 9626, 9633, 9636, 9638, 9641, 9733, 9744, 9746, 9753, 9765, 9793, 9801, 9813,
    9824, 9825, 9833, 9860, 9862, 9872, 9882, 10240, 10242, 10248, 10250, 10261, 10272, 10274, 10280, 10282,
    10309, 10321, 10324, 10341, 10368, 10370, 10376, 10378, 10400, 10402, 10408, 10410, 10505, 10513, 10516, 10521,
    10533, 10566, 10569, 10578, 10581, 10593, 10596, 10598, 10601, 10629, 10640, 10646, 10649, 10660, 10661, 10752,
    10754, 10760, 10762, 10784, 10786, 10792, 10794, 10821, 10833, 10838, 10841, 10853, 10880, 10882, 10888, 10890,
    10901, 10912, 10914, 10920, 10922, 16389, 16401, 16406, 16421, 16457, 16466, 16469, 16472, 16474, 16481, 16484,
    16486, 16532, 16537, 16545, 16550, 16640, 16641, 16644, 16646, 16649, 16658, 16661, 16662, 16664, 16666, 16673,
    16678, 16681, 16709, 16712, 16714, 16721, 16724, 16725, 16726, 16729, 16730, 16741, 16744, 16746, 16769, 16772,
    16774, 16784, 16786, 16789, 16800, 16801, 16802, 16901, 16913, 16916, 16918, 16933, 16961, 16978, 16981, 16986,
    16996, 17001, 17033, 17044, 17061, 17409, 17429, 17433, 17449, 17477, 17480, 17482, 17489, 17492, 17493, 17494,
    17505, 17506, 17509, 17512, 17514, 17537, 17542, 17545, 17552, 17554, 17557, 17568, 17569, 17577, 17665, 17666,
    17669, 17674, 17681, 17684, 17685, 17686, 17689, 17696, 17701, 17706, 17729, 17732, 17733, 17734, 17737, 17744,
    17745, 17748, 17749, 17750, 17752, 17753, 17761, 17764, 17765, 17766, 17769, 17794, 17796, 17797, 17800, 17809,
    17812, 17813, 17814, 17817, 17818, 17829, 17832, 17834, 17921, 17925, 17929, 17940, 17941, 17944, 17946, 17953,
    17956, 17961, 17984, 17986, 17989, 17992, 18000, 18001, 18002, 18005, 18006, 18009, 18018, 18021, 18024, 18049,
    18053, 18058, 18068, 18069, 18081, 18084, 18086, 18437, 18449, 18453, 18458, 18469, 18498, 18505, 18512, 18517,
    18520, 18529, 18532, 18534, 18537, 18565, 18577, 18580, 18582, 18585, 18597, 18689, 18693, 18694, 18698, 18704,
    18708, 18709, 18712, 18721, 18724, 18726, 18752, 18757, 18762, 18769, 18770, 18772, 18773, 18774, 18777, 18784,
    18786, 18789, 18790, 18794, 18822, 18825, 18834, 18837, 18838, 18840, 18849, 18852, 18854, 18857, 18966, 19012,
    19014, 19017, 19029, 19032, 19034, 19044, 19049, 19092, 19109, 20481, 20484, 20485, 20486, 20489, 20498, 20501,
    20506, 20513, 20516, 20521, 20544, 20549, 20552, 20561, 20564, 20565, 20566, 20569, 20581, 20584, 20614, 20617,
    20629, 20632, 20640, 20641, 20646, 20649, 20741, 20744, 20745, 20746, 20753, 20756, 20757, 20758, 20760, 20761,
    20768, 20773, 20774, 20776, 20778, 20801, 20804, 20805, 20806, 20809, 20816, 20817, 20818, 20820, 20821, 20822,
    20824, 20825, 20826, 20833, 20836, 20837, 20838, 20841, 20866, 20869, 20881, 20884, 20885, 20886, 20889, 20896,
    20901, 20906, 20993, 20998, 21010, 21013, 21018, 21025, 21028, 21058, 21061, 21066, 21073, 21076, 21077, 21078,
    21081, 21090, 21093, 21125, 21136, 21138, 21141, 21145, 21146, 21156, 21508, 21509, 21521, 21524, 21525, 21526,
    21528, 21529, 21537, 21541, 21544, 21546, 21569, 21572, 21573, 21574, 21577, 21578, 21584, 21585, 21588, 21589,
    21590, 21592, 21593, 21594, 21601, 21602, 21604, 21605, 21606, 21609, 21632, 21640, 21642, 21649, 21652, 21653,
    21654, 21657, 21665, 21668, 21669, 21674, 21761, 21762, 21764, 21765, 21766, 21769, 21776, 21777, 21778, 21780,
    21781, 21782, 21785, 21786, 21793, 21796, 21797, 21798, 21801, 21824, 21825, 21826, 21828, 21829, 21830, 21832,
    21833, 21840, 21841, 21842, 21844, 21845, 21846, 21848, 21849, 21850, 21856, 21857, 21860, 21861, 21862, 21864,
    21865, 21866, 21889, 21892, 21893, 21897, 21898, 21904, 21905, 21908, 21909, 21910, 21912, 21913, 21921, 21924,
    21925, 21926, 21929, 22016, 22017, 22018, 22020, 22022, 22024, 22025, 22033, 22036, 22037, 22040, 22041, 22048,
    22049, 22050, 22052, 22053, 22054, 22056, 22057, 22081, 22085, 22086, 22088, 22089, 22090, 22096, 22097, 22098,
    22100, 22101, 22102, 22104, 22105, 22106, 22113, 22116, 22117, 22121, 22146, 22149, 22150, 22152, 22153, 22154,
    22161, 22165, 22170, 22178, 22181, 22182, 22184, 22185, 22532, 22533, 22534, 22537, 22544, 22549, 22552, 22561,
    22570, 22597, 22600, 22602, 22609, 22612, 22613, 22614, 22616, 22617, 22624, 22626, 22628, 22629, 22658, 22665,
    22672, 22674, 22677, 22680, 22689, 22697, 22785, 22786, 22789, 22794, 22801, 22804, 22805, 22806, 22809, 22821,
    22849, 22852, 22853, 22854, 22857, 22864, 22865, 22866, 22868, 22869, 22870, 22872, 22873, 22874, 22881, 22884,
    22885, 22886, 22889, 22913, 22917, 22921, 22929, 22932, 22933, 22934, 22936, 22937, 22949, 23044, 23048, 23061,
    23066, 23072, 23077, 23078, 23081, 23109, 23112, 23113, 23121, 23125, 23126, 23128, 23129, 23138, 23141, 23144,
    23146, 23169, 23178, 23186, 23189, 23190, 23192, 23194, 23201, 24581, 24596, 24598, 24601, 24613, 24644, 24656,
    24661, 24662, 24664, 24666, 24673, 24676, 24678, 24681, 24705, 24726, 24741, 24833, 24836, 24838, 24841, 24850,
    24853, 24865, 24866, 24870, 24873, 24901, 24905, 24913, 24917, 24918, 24921, 24933, 24934, 24938, 24964, 24970,
    24978, 24981, 24993, 24998, 25001, 25105, 25110, 25113, 25152, 25153, 25158, 25173, 25174, 25176, 25184, 25221,
    25233, 25238, 25253, 25617, 25618, 25621, 25622, 25626, 25633, 25638, 25641, 25664, 25666, 25669, 25672, 25674,
    25681, 25684, 25685, 25686, 25689, 25690, 25696, 25698, 25701, 25732, 25733, 25737, 25744, 25746, 25748, 25749,
    25750, 25752, 25754, 25761, 25764, 25769, 25861, 25864, 25866, 25873, 25877, 25878, 25881, 25924, 25925, 25926,
    25929, 25936, 25937, 25940, 25941, 25942, 25945, 25953, 25956, 25957, 25958, 25961, 25990, 25993, 25994, 26001,
    26005, 26006, 26009, 26010, 26018, 26021, 26022, 26024, 26114, 26121, 26133, 26144, 26150, 26152, 26153, 26176,
    26181, 26184, 26186, 26193, 26196, 26197, 26198, 26200, 26202, 26208, 26213, 26216, 26240, 26242, 26245, 26250,
    26260, 26262, 26264, 26265, 26272, 26276, 26278, 26282, 26646, 26649, 26661, 26689, 26706, 26709, 26714, 26721,
    26729, 26757, 26769, 26776, 26790, 26881, 26884, 26896, 26901, 26913, 26916, 26918, 26921, 26944, 26945, 26949,
    26950, 26952, 26961, 26964, 26965, 26966, 26969, 26976, 26981, 26986, 27010, 27012, 27018, 27029, 27041, 27044,
    27045, 27049, 27153, 27158, 27160, 27201, 27204, 27209, 27216, 27221, 27224, 27226, 27236, 27237, 27241, 27270,
    27284, 27288, 27290, 27302, 32768, 32770, 32776, 32778, 32800, 32802, 32808, 32810, 32837, 32848, 32849, 32852,
    32854, 32857, 32869, 32896, 32898, 32904, 32906, 32917, 32928, 32930, 32936, 32938, 33029, 33041, 33044, 33046,
    33049, 33061, 33089, 33092, 33097, 33104, 33106, 33109, 33110, 33112, 33113, 33124, 33126, 33129, 33157, 33161,
    33172, 33174, 33177, 33189, 33280, 33282, 33288, 33290, 33301, 33312, 33314, 33320, 33322, 33361, 33364, 33369,
    33381, 33408, 33410, 33416, 33418, 33429, 33440, 33442, 33448, 33450, 33812, 33817, 33857, 33860, 33873, 33877,
    33882, 33889, 33892, 33897, 33940, 33945, 34049, 34057, 34066, 34069, 34074, 34086, 34089, 34112, 34113, 34117,
    34120, 34129, 34132, 34133, 34134, 34137, 34138, 34149, 34150, 34152, 34154, 34177, 34180, 34182, 34185, 34192,
    34194, 34197, 34200, 34214, 34321, 34326, 34329, 34341, 34369, 34372, 34377, 34378, 34384, 34389, 34393, 34394,
    34401, 34406, 34410, 34437, 34449, 34458, 34468, 34816, 34818, 34824, 34826, 34837, 34848, 34850, 34856, 34858,
    34881, 34885, 34897, 34900, 34905, 34917, 34921, 34944, 34946, 34952, 34954, 34965, 34976, 34978, 34984, 34986,
    35077, 35078, 35089, 35092, 35094, 35109, 35137, 35140, 35142, 35145, 35152, 35154, 35157, 35162, 35169, 35172,
    35205, 35222, 35225, 35237, 35328, 35330, 35336, 35338, 35349, 35360, 35362, 35368, 35370, 35397, 35409, 35412,
    35414, 35456, 35458, 35464, 35466, 35477, 35488, 35490, 35496, 35498, 36869, 36881, 36886, 36888, 36889, 36901,
    36929, 36934, 36937, 36949, 36952, 36954, 36969, 36970, 36997, 37009, 37012, 37014, 37017, 37029, 37121, 37124,
    37126, 37129, 37136, 37141, 37144, 37146, 37153, 37156, 37158, 37161, 37184, 37189, 37200, 37201, 37204, 37205,
    37206, 37209, 37218, 37221, 37252, 37254, 37266, 37269, 37272, 37281, 37284, 37286, 37289, 37381, 37393, 37396,
    37401, 37413, 37444, 37446, 37449, 37456, 37458, 37461, 37464, 37478, 37481, 37509, 37524, 37526, 37545, 37889,
    37892, 37894, 37904, 37909, 37912, 37926, 37952, 37962, 37969, 37972, 37973, 37974, 37976, 37977, 37984, 37985,
    37986, 37989, 38020, 38022, 38034, 38036, 38037, 38040, 38049, 38057, 38144, 38149, 38152, 38154, 38160, 38161,
    38164, 38165, 38166, 38169, 38177, 38181, 38185, 38186, 38209, 38212, 38213, 38214, 38217, 38224, 38225, 38226,
    38228, 38229, 38230, 38232, 38233, 38234, 38241, 38244, 38245, 38246, 38249, 38273, 38277, 38280, 38289, 38290,
    38292, 38293, 38294, 38297, 38298, 38304, 38306, 38309, 38312, 38314, 38401, 38404, 38416, 38421, 38425, 38432,
    38438, 38441, 38469, 38472, 38473, 38481, 38482, 38485, 38486, 38489, 38501, 38504, 38530, 38532, 38537, 38538,
    38546, 38548, 38549, 38564, 38566, 38569, 38917, 38934, 38937, 38949, 38977, 38982, 38992, 38994, 38997, 38998,
    39002, 39012, 39013, 39045, 39057, 39062, 39065, 39077, 39172, 39174, 39177, 39184, 39186, 39189, 39192, 39194,
    39200, 39201, 39204, 39206, 39232, 39234, 39237, 39240, 39242, 39249, 39252, 39253, 39254, 39257, 39266, 39269,
    39270, 39274, 39297, 39300, 39312, 39314, 39317, 39322, 39329, 39334, 39429, 39445, 39461, 39492, 39494, 39497,
    39504, 39509, 39512, 39521, 39557, 39569, 39572, 39573, 39574, 40960, 40962, 40968, 40970, 40981, 40992, 40994,
    41000, 41002, 41029, 41041, 41044, 41046, 41049, 41088, 41090, 41096, 41098, 41109, 41120, 41122, 41128, 41130,
    41221, 41225, 41233, 41236, 41238, 41241, 41242, 41286, 41289, 41297, 41301, 41304, 41306, 41313, 41316, 41349,
    41360, 41362, 41366, 41369, 41474, 41480, 41482, 41488, 41497, 41506, 41512, 41514, 41541, 41553, 41558, 41561,
    41573, 41600, 41602, 41608, 41610, 41621, 41632, 41634, 41640, 41642, 42009, 42021, 42049, 42052, 42064, 42068,
    42069, 42072, 42074, 42081, 42085, 42086, 42088, 42089, 42117, 42246, 42249, 42256, 42258, 42261, 42264, 42278,
    42281, 42306, 42309, 42321, 42324, 42325, 42326, 42329, 42341, 42346, 42369, 42372, 42373, 42374, 42377, 42386,
    42389, 42392, 42501, 42513, 42518, 42522, 42529, 42533, 42564, 42566, 42570, 42578, 42581, 42582, 42584, 42592,
    42594, 42630, 42640, 42645, 42646, 42649, 42657, 42660, 42662, 43008, 43010, 43016, 43018, 43040, 43042, 43048,
    43050, 43089, 43092, 43094, 43097, 43136, 43138, 43144, 43146, 43157, 43168, 43170, 43176, 43178, 43269, 43284,
    43289, 43297, 43301, 43329, 43344, 43349, 43354, 43361, 43366, 43369, 43408, 43414, 43520, 43522, 43528, 43530,
    43552, 43554, 43560, 43562, 43601, 43604, 43606, 43648, 43650, 43656, 43658, 43669, 43680, 43682, 43688, 43690,
)

DELTA = np.float32(0.125)                                    # IQ1S_DELTA = IQ1M_DELTA
X_P = np.array([-1 + DELTA, DELTA, 1 + DELTA], np.float32)   # the levels of a +delta block
X_M = np.array([-1 - DELTA, -DELTA, 1 - DELTA], np.float32)  # and of a -delta one
GROUP_MAX_EPS_IQ1_S = np.float32(1e-12)
GROUP_MAX_EPS_IQ1_M = np.float32(1e-7)
IQ1S_FUDGE = np.float32(1.125)
IQ1M_FUDGE = np.float32(1.1125)
M_MASKS = np.array([0x00, 0x80, 0x08, 0x88], np.uint8)       # IQ1_M's shift bits of the two halves (k = 0..3)


@cache
def tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The grid [2048, 8], key map and neighbour lists (``nwant`` 3) of IQ1_S and IQ1_M, built on first use."""
    return grid_tables(KGRID_1BIT_2048, 3, dim=8, bits=2, levels=3)


@njit(cache=True, error_model="numpy", inline="always")
def _sort(xb, n, order):
    """``order`` = the indices of ``xb[:n]`` by ascending value, equal values in index order (glibc's ``qsort``: a
    merge sort, stable, for arrays this small)."""
    for j in range(n):
        order[j] = j
    for j in range(1, n):
        o = order[j]
        v = xb[o]
        k = j
        while k > 0 and xb[order[k - 1]] > v:
            order[k] = order[k - 1]
            k -= 1
        order[k] = o


@njit(cache=True, error_model="numpy", inline="always")
def _best_neighbour(neighbours, start, grid, xb, weight, o, scale, xx, L):
    """``iq1_find_best_neighbour2`` for the group ``xb[o:o + 8]``: the listed grid point whose levels ``xx`` times
    ``scale`` are nearest under ``weight`` (the first of equal distances); its levels go to ``L[o:o + 8]``. (C falls
    back to the whole grid, then aborts, when every distance overflows; finite input never gets there.)"""
    best_d2 = FLT_MAX
    gi = np.int64(neighbours[start + 1])
    for j in range(1, np.int64(neighbours[start]) + 1):
        g = np.int64(neighbours[start + j])
        d2 = F0
        for i in range(8):
            diff = scale * xx[(grid[g, i] - 1) // 2] - xb[o + i]
            d2 += weight[o + i] * diff * diff
        if d2 < best_d2:
            best_d2 = d2
            gi = g
    for i in range(8):
        L[o + i] = (grid[gi, i] - 1) // 2
    return gi


@njit(cache=True, error_model="numpy", inline="always")
def _grid_index(L, o, xb, weight, scale, xx, grid, kmap, neighbours):
    """The grid index of the levels ``L[o:o + 8]``, or of the nearest listed neighbour (then -(index + 1))."""
    u = 0
    for j in range(8):
        u |= L[o + j] << (2 * j)
    gi = np.int64(kmap[u])
    if gi >= 0:
        return gi
    return -_best_neighbour(neighbours, -gi - 1, grid, xb, weight, o, scale, xx, L) - 1


@njit(cache=True, error_model="numpy", inline="always")
def _block_weights(xb, qw, sigma2, weighted, weight):
    for i in range(xb.shape[0]):
        weight[i] = qw[i] * np.float32(np.sqrt(sigma2 + xb[i] * xb[i])) if weighted else xb[i] * xb[i]


@njit(cache=True, error_model="numpy", inline="always")
def _abs_max(xb):
    mx = abs(xb[0])
    for i in range(1, xb.shape[0]):
        a = abs(xb[i])
        mx = mx if mx > a else a
    return mx


@njit(cache=True, error_model="numpy", inline="always")
def _levels(order, n, i1, i2, L):
    for j in range(n):
        L[order[j]] = 0 if j < i1 else 1 if j < i2 else 2


@njit(cache=True, error_model="numpy", parallel=True, nogil=True)
def iq1_s_rows(x, qw, widx, grid, kmap, neighbours):
    """IQ1_S for rows ``x`` [R, C] (C a multiple of 256) with the importance weights ``qw`` [n, C] (``widx`` [R]: the
    weight row of each row; C asserts it has them). Returns per super-block the scale ``d`` [nb] (float32, before
    fp16 rounding), the low 8 bits of the 32 grid indices ``qs`` [nb, 32] and per 32-weight block ``qh`` [nb, 8]
    (uint16: the 3 high bits of its 4 indices, the 3-bit scale at bit 12, the -delta flag at bit 15)."""
    R, C = x.shape
    nper = C // 256
    nb = R * nper
    d_out = np.zeros(nb, np.float32)
    qs = np.zeros((nb, 32), np.uint8)
    qh = np.zeros((nb, 8), np.uint16)
    chunk = 16
    for ch in prange((nb + chunk - 1) // chunk):
        weight = np.empty(32, np.float32)
        sumx = np.empty(33, np.float32)
        sumw = np.empty(33, np.float32)
        order = np.empty(32, np.int64)
        L = np.empty(32, np.int64)
        index = np.empty(4, np.int64)
        scales = np.empty(8, np.float32)
        shifts = np.empty(8, np.int64)
        xp0, xp1, xp2 = X_P[0], X_P[1], X_P[2]
        xm0, xm1, xm2 = X_M[0], X_M[1], X_M[2]
        for b in range(ch * chunk, min(nb, (ch + 1) * chunk)):
            r = b // nper
            off = (b - r * nper) * 256
            xs = x[r, off:off + 256]
            sigma2 = _sigma2(xs)
            max_scale = F0
            for ib in range(8):
                xb = xs[32 * ib:32 * ib + 32]
                _block_weights(xb, qw[widx[r], off + 32 * ib:off + 32 * ib + 32], sigma2, True, weight)
                scales[ib] = F0
                shifts[ib] = 1
                if _abs_max(xb) < GROUP_MAX_EPS_IQ1_S:
                    continue
                _sort(xb, 32, order)
                sumx[0] = F0
                sumw[0] = F0
                for j in range(32):
                    i = order[j]
                    sumx[j + 1] = sumx[j] + weight[i] * xb[i]
                    sumw[j + 1] = sumw[j] + weight[i]
                best = -FLT_MAX
                scale = F0
                besti1 = besti2 = -1
                best_shift = 0
                for i1 in range(33):
                    a = sumx[i1] - sumx[0]
                    wa = sumw[i1] - sumw[0]
                    for i2 in range(i1, 33):
                        bx = sumx[i2] - sumx[i1]
                        cx = sumx[32] - sumx[i2]
                        bw = sumw[i2] - sumw[i1]
                        cw = sumw[32] - sumw[i2]
                        sumqx = a * xp0 + bx * xp1 + cx * xp2
                        sumq2 = wa * xp0 * xp0 + bw * xp1 * xp1 + cw * xp2 * xp2
                        if sumq2 > F0 and sumqx * sumqx > best * sumq2:
                            scale = sumqx / sumq2
                            best = scale * sumqx
                            besti1, besti2, best_shift = i1, i2, 1
                        sumqx = a * xm0 + bx * xm1 + cx * xm2
                        sumq2 = wa * xm0 * xm0 + bw * xm1 * xm1 + cw * xm2 * xm2
                        if sumq2 > F0 and sumqx * sumqx > best * sumq2:
                            scale = sumqx / sumq2
                            best = scale * sumqx
                            besti1, besti2, best_shift = i1, i2, -1
                if besti1 < 0:
                    continue
                _levels(order, 32, besti1, besti2, L)
                if scale < F0:
                    for j in range(32):
                        L[j] = 2 - L[j]
                    scale = -scale
                    best_shift = -best_shift
                xx = X_P if best_shift == 1 else X_M
                all_on_grid = True
                for k in range(4):
                    gi = _grid_index(L, 8 * k, xb, weight, scale, xx, grid, kmap, neighbours)
                    if gi < 0:
                        all_on_grid = False
                        gi = -gi - 1
                    index[k] = gi
                if not all_on_grid:
                    sumqx = F0
                    sumq2 = F0
                    for k in range(4):
                        for j in range(8):
                            w = weight[8 * k + j]
                            q = xx[(grid[index[k], j] - 1) // 2]
                            sumqx += w * q * xb[8 * k + j]
                            sumq2 += w * q * q
                    if sumqx > F0 and sumq2 > F0:
                        scale = sumqx / sumq2
                h = 0
                for k in range(4):
                    qs[b, 4 * ib + k] = index[k] & 255
                    h |= (index[k] >> 8) << (3 * k)
                qh[b, ib] = h
                scales[ib] = scale
                shifts[ib] = best_shift
                max_scale = max_scale if max_scale > scale else scale
            if max_scale == F0:
                continue
            d = max_scale / F15
            d_out[b] = d * IQ1S_FUDGE
            id_ = F1 / d
            for ib in range(8):
                l = max(0, min(7, nearest_int(F05 * (id_ * scales[ib] - F1))))
                if shifts[ib] == -1:
                    l |= 8
                qh[b, ib] |= l << 12
    return d_out, qs, qh


@njit(cache=True, error_model="numpy", inline="always")
def _m_levels(k, half):
    """IQ1_M's levels of half block ``half`` for the shift choice ``k`` (0: ++, 1: +-, 2: -+, 3: --)."""
    if half == 0:
        return X_P if k < 2 else X_M
    return X_P if k % 2 == 0 else X_M


@njit(cache=True, error_model="numpy", parallel=True, nogil=True)
def iq1_m_rows(x, qw, widx, weighted, grid, kmap, neighbours):
    """IQ1_M for rows ``x`` [R, C] (C a multiple of 256); ``qw`` [n, C] and ``widx`` [R] as for IQ1_S, read only when
    ``weighted``. Returns per super-block the low 8 bits of the 32 grid indices ``qs`` [nb, 32], per 16-weight block
    ``qh`` [nb, 16] (the high 3 bits of its two indices at bits 0 and 4, the -delta flags at bits 3 and 7), the four
    uint16 ``sc`` [nb, 4] with the 3-bit block scales (12 bits each; the fp16 scale's nibbles go to their top bits
    when packing) and that scale ``d`` [nb] (float32, before fp16 rounding; 0 when every block is zero)."""
    R, C = x.shape
    nper = C // 256
    nb = R * nper
    d_out = np.zeros(nb, np.float32)
    qs = np.zeros((nb, 32), np.uint8)
    qh = np.zeros((nb, 16), np.uint8)
    sc = np.zeros((nb, 4), np.uint16)
    p2, m2 = X_P[2], X_M[2]
    cp1 = X_P[0] * X_P[0] - X_P[1] * X_P[1]
    cp2 = X_P[1] * X_P[1] - X_P[2] * X_P[2]
    cm1 = X_M[0] * X_M[0] - X_M[1] * X_M[1]
    cm2 = X_M[1] * X_M[1] - X_M[2] * X_M[2]
    chunk = 16
    for ch in prange((nb + chunk - 1) // chunk):
        weight = np.empty(16, np.float32)
        px = np.empty((2, 17), np.float32)
        pw = np.empty((2, 17), np.float32)
        order = np.empty(16, np.int64)
        L = np.empty(16, np.int64)
        index = np.empty((16, 2), np.int64)
        scales = np.empty(16, np.float32)
        shifts = np.empty(16, np.int64)
        for b in range(ch * chunk, min(nb, (ch + 1) * chunk)):
            r = b // nper
            off = (b - r * nper) * 256
            xs = x[r, off:off + 256]
            sigma2 = _sigma2(xs) if weighted else F0
            max_scale = F0
            for ib in range(16):
                xb = xs[16 * ib:16 * ib + 16]
                _block_weights(xb, qw[widx[r], off + 16 * ib:off + 16 * ib + 16], sigma2, weighted, weight)
                scales[ib] = F0
                shifts[ib] = 0
                index[ib, 0] = index[ib, 1] = 0
                if _abs_max(xb) < GROUP_MAX_EPS_IQ1_M:
                    continue
                _sort(xb, 16, order)
                for h in range(2):
                    px[h, 0] = F0
                    pw[h, 0] = F0
                for j in range(16):
                    i = order[j]
                    h = 0 if i < 8 else 1
                    px[h, j + 1] = px[h, j] + weight[i] * xb[i]
                    px[1 - h, j + 1] = px[1 - h, j]
                    pw[h, j + 1] = pw[h, j] + weight[i]
                    pw[1 - h, j + 1] = pw[1 - h, j]
                tx0, tx1, tw0, tw1 = px[0, 16], px[1, 16], pw[0, 16], pw[1, 16]
                best = -FLT_MAX
                scale = F0
                besti1 = besti2 = best_k = -1
                for i1 in range(17):
                    for i2 in range(i1, 17):
                        sx = px[0, i1] + px[0, i2]
                        qxp0 = tx0 * p2 - sx
                        qxm0 = tx0 * m2 - sx
                        q2p0 = tw0 * p2 * p2 + pw[0, i1] * cp1 + pw[0, i2] * cp2
                        q2m0 = tw0 * m2 * m2 + pw[0, i1] * cm1 + pw[0, i2] * cm2
                        sx = px[1, i1] + px[1, i2]
                        qxp1 = tx1 * p2 - sx
                        qxm1 = tx1 * m2 - sx
                        q2p1 = tw1 * p2 * p2 + pw[1, i1] * cp1 + pw[1, i2] * cp2
                        q2m1 = tw1 * m2 * m2 + pw[1, i1] * cm1 + pw[1, i2] * cm2
                        for k in range(4):   # the delta choices in C's order: ++, +-, -+, --
                            sq = (qxp0 if k < 2 else qxm0) + (qxp1 if k % 2 == 0 else qxm1)
                            s2 = (q2p0 if k < 2 else q2m0) + (q2p1 if k % 2 == 0 else q2m1)
                            if s2 > F0 and sq * sq > best * s2:
                                scale = sq / s2
                                best = scale * sq
                                besti1, besti2, best_k = i1, i2, k
                if besti1 < 0:
                    continue
                _levels(order, 16, besti1, besti2, L)
                if scale < F0:
                    for j in range(16):
                        L[j] = 2 - L[j]
                    scale = -scale
                    best_k = 3 - best_k
                all_on_grid = True
                for k in range(2):
                    gi = _grid_index(L, 8 * k, xb, weight, scale, _m_levels(best_k, k), grid, kmap, neighbours)
                    if gi < 0:
                        all_on_grid = False
                        gi = -gi - 1
                    index[ib, k] = gi
                if not all_on_grid:
                    sx = F0
                    s2 = F0
                    for k in range(2):
                        xx = _m_levels(best_k, k)
                        for j in range(8):
                            w = weight[8 * k + j]
                            q = xx[(grid[index[ib, k], j] - 1) // 2]
                            sx += w * q * xb[8 * k + j]
                            s2 += w * q * q
                    if sx > F0 and s2 > F0:
                        scale = sx / s2
                qs[b, 2 * ib] = index[ib, 0] & 255
                qs[b, 2 * ib + 1] = index[ib, 1] & 255
                qh[b, ib] = (index[ib, 0] >> 8) | ((index[ib, 1] >> 8) << 4)
                scales[ib] = scale
                shifts[ib] = best_k
                max_scale = max_scale if max_scale > scale else scale
            if max_scale == F0:
                continue
            d = max_scale / F15
            id_ = F1 / d
            sx = F0
            s2 = F0
            for ib in range(16):
                l = max(0, min(7, nearest_int(F05 * (id_ * scales[ib] - F1))))
                sc[b, ib // 4] |= l << (3 * (ib % 4))
                qh[b, ib] |= M_MASKS[shifts[ib]]
                xb = xs[16 * ib:16 * ib + 16]
                _block_weights(xb, qw[widx[r], off + 16 * ib:off + 16 * ib + 16], sigma2, weighted, weight)
                fl = np.float32(2 * l + 1)
                for k in range(2):
                    xx = _m_levels(shifts[ib], k)
                    for j in range(8):
                        w = weight[8 * k + j]
                        q = xx[(grid[index[ib, k], j] - 1) // 2] * fl
                        sx += w * q * xb[8 * k + j]
                        s2 += w * q * q
            if s2 > F0:
                d = sx / s2
            d_out[b] = d * IQ1M_FUDGE
    return qs, qh, sc, d_out


KERNELS = (iq1_s_rows, iq1_m_rows)
