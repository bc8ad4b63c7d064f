"""AWQ GEMM packing and the group quantizer: round trips, the hand-checked word, dequant == fake-quant."""

from __future__ import annotations

import pytest
import torch

from releaser.awq.pack import ORDER, REVERSE, dequantize, pack, unpack
from releaser.awq.quantize import choose_group_size, fake_quantize, quantize
from releaser.errors import ModelError


def test_hand_checked_word():
    codes = torch.arange(8, dtype=torch.uint8).view(1, 8)          # column j holds code j
    word = pack(codes)
    assert word.dtype == torch.int32 and word.shape == (1, 1)
    assert int(word[0, 0]) == 0x75316420                             # nibbles 0..7 hold columns 0,2,4,6,1,3,5,7
    assert torch.equal(unpack(word), codes)


def test_orders_are_inverse():
    assert [ORDER[REVERSE[j]] for j in range(8)] == list(range(8))


def test_negative_words_when_nibble_seven_is_high():
    codes = torch.zeros(1, 8, dtype=torch.uint8)
    codes[0, 7] = 15                                                  # column 7 lives in nibble 7 (bits 28..31)
    word = pack(codes)
    assert int(word[0, 0]) == -(2**32 - (15 << 28))
    assert torch.equal(unpack(word), codes)


@pytest.mark.parametrize("seed", range(20))
def test_round_trip_random(seed):
    g = torch.Generator().manual_seed(seed)
    rows = int(torch.randint(1, 40, (1,), generator=g))
    cols = 8 * int(torch.randint(1, 20, (1,), generator=g))
    codes = torch.randint(0, 16, (rows, cols), generator=g, dtype=torch.uint8)
    words = pack(codes)
    assert words.shape == (rows, cols // 8)
    assert torch.equal(unpack(words), codes)
    assert torch.equal(pack(unpack(words)), words)                  # and words -> codes -> words


def test_random_words_round_trip():
    words = torch.randint(-2**31, 2**31 - 1, (16, 12), dtype=torch.int64).to(torch.int32)
    assert torch.equal(pack(unpack(words)), words)


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError):
        pack(torch.zeros(2, 12, dtype=torch.uint8))
    with pytest.raises(ValueError):
        pack(torch.full((1, 8), 16, dtype=torch.int64))


@pytest.mark.parametrize("group", [32, 64, 128])
def test_dequantized_checkpoint_equals_fake_quantized(group):
    torch.manual_seed(group)
    w = torch.randn(48, 256) * 0.05
    w[:, 3] *= 30                                                     # an outlier column
    q = quantize(w, group)
    qweight, qzeros, scales = pack(q.codes.t()), pack(q.zeros.t()), q.scales.t().contiguous()
    assert qweight.shape == (256, 6) and qzeros.shape == (256 // group, 6) and scales.shape == (256 // group, 48)
    assert scales.dtype == torch.float16
    deq = dequantize(qweight, qzeros, scales, group)
    assert torch.equal(deq, q.dequantize())                           # exactly what the quantizer computed
    # each weight is within half a step of its original value (no clipping was applied)
    step = q.scales.float().repeat_interleave(group, 1)
    assert torch.all((deq - w).abs() <= step / 2 + 1e-6)
    # and the float32 fake-quantizer (float32 scales) agrees but for a few codes moved by the float16 scale rounding
    diff = (deq - fake_quantize(w, group)).abs()
    assert torch.all(diff <= step * 1.01)
    assert float((diff > step * 0.01).float().mean()) < 0.01


def test_choose_group_size():
    assert choose_group_size(128, {"hidden_size": 4096, "intermediate_size": 11008}) == 128
    assert choose_group_size(128, {"hidden_size": 576, "intermediate_size": 1536}) == 64   # SmolLM2
    assert choose_group_size(64, {"hidden_size": 96}) == 32
    with pytest.raises(ModelError, match="no usable AWQ group size"):
        choose_group_size(128, {"hidden_size": 40})
