"""The grid tables of llama.cpp's grid I-quants: ``iq3xs_init_impl`` (IQ3_XXS / IQ3_S: 4 coordinates of 3 bits) and
``iq2xs_init_impl`` (IQ2_XXS / IQ2_XS / IQ2_S: 8 coordinates of 2 bits; IQ1_S / IQ1_M: the same with the 1-bit grid
stored as 2-bit levels 0..2) of ``ggml/src/ggml-quants.c``.

A grid is a list of keys: coordinate ``i`` of point ``k`` is the level ``l = (kgrid[k] >> bits * i) & (2**bits - 1)``
and its value ``2l + 1``. A quantizer rounds a group of ``dim`` magnitudes to levels, packs them into the same kind of
key and looks it up in ``kmap``: a grid index (>= 0), or, off the grid, ``-(offset + 1)``: at ``neighbours[offset]``
the count ``c``, then the ``c`` grid indices at the ``nwant`` smallest squared distances from the group's point
(every point at each of those distances), nearest first, equal distances by index (C's qsort on (distance, index)).

C fills the neighbour lists of every key below its ``kmap_size`` (IQ2's 43692 includes keys with a level 3 that no
quantizer forms); we fill those of the keys whose levels are all below ``levels`` (IQ2/IQ1 quantizers clamp to 0..2),
and mark the others :data:`UNREACHABLE`. Only the offsets differ from C's (they are internal); every list is C's.
"""

from __future__ import annotations

import numpy as np

#: ``kmap`` of a key no quantizer forms (a level at or above ``levels``): neither on the grid nor listed.
UNREACHABLE = np.int32(np.iinfo(np.int32).min)

_CHUNK = 512   # keys per distance matrix ([chunk, n, dim] int32 while summing: 32 MB for a 2048-point grid)


def grid_tables(kgrid, nwant: int, dim: int = 4, bits: int = 3, levels: int | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The grid points [n, dim] (int8 values ``2l + 1``), the map of the ``2**(dim * bits)`` keys to a grid index or
    ``-(offset + 1)`` into the neighbour lists (:data:`UNREACHABLE` for a key with a level >= ``levels``, default
    ``2**bits``), and the lists (uint16: the count, then the grid indices). IQ3: ``dim=4, bits=3``; IQ2/IQ1:
    ``dim=8, bits=2, levels=3``. ``nwant``: C's (IQ3_XXS 2, IQ3_S 3, IQ2_XXS/IQ2_XS 2, IQ2_S 1, IQ1_S/IQ1_M 3)."""
    kgrid = np.asarray(kgrid, np.int64)
    mask = (1 << bits) - 1
    shifts = bits * np.arange(dim)
    grid = (2 * ((kgrid[:, None] >> shifts) & mask) + 1).astype(np.int8)
    size = 1 << (bits * dim)
    kmap = np.full(size, UNREACHABLE, np.int32)
    kmap[kgrid] = np.arange(len(kgrid), dtype=np.int32)
    keys = np.arange(size, dtype=np.int64)
    reachable = (((keys[:, None] >> shifts) & mask) < (levels if levels is not None else 1 << bits)).all(axis=1)
    off = keys[reachable & (kmap == UNREACHABLE)]
    g = grid.astype(np.int32)
    parts = []
    start = 0
    for c0 in range(0, len(off), _CHUNK):
        chunk = off[c0:c0 + _CHUNK]
        pos = 2 * ((chunk[:, None] >> shifts) & mask).astype(np.int32) + 1
        d2 = ((g[None, :, :] - pos[:, None, :]) ** 2).sum(axis=2)   # [chunk, n]
        t = d2.min(axis=1)
        for _ in range(nwant - 1):   # the nwant-th smallest distinct distance (all points when there are fewer)
            t = np.where(d2 > t[:, None], d2, np.iinfo(np.int32).max).min(axis=1)
        keep = d2 <= t[:, None]
        r, j = np.nonzero(keep)
        order = np.lexsort((j, d2[r, j], r))   # by row, then distance, then index
        r, j = r[order], j[order]
        counts = keep.sum(axis=1)
        starts = np.concatenate([[0], np.cumsum(counts + 1)[:-1]])
        flat = np.empty(int((counts + 1).sum()), np.uint16)
        flat[starts] = counts
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])   # each row's first entry in (r, j)
        flat[starts[r] + 1 + np.arange(len(r)) - first[r]] = j
        kmap[chunk] = -(start + starts.astype(np.int32) + 1)
        start += len(flat)
        parts.append(flat)
    neighbours = np.concatenate(parts) if parts else np.zeros(0, np.uint16)
    return grid, kmap, neighbours
