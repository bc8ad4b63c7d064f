"""Sparsifiers for the task-arithmetic family (mergekit 0.1.5 semantics).

Every sparsifier keeps a subset of a task vector and, when ``rescale`` is set, scales the kept part so that its L1 norm
matches the L1 norm of the whole vector (not ``1/density``: mergekit switched to L1 matching in 2025). ``density >= 1``
returns the input unchanged. Random sparsifiers draw from the ``generator`` they are given.
"""

from __future__ import annotations

import torch

from releaser.errors import ConfigError

_NORM_EPS = 1e-7


def _apply_mask(delta: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    kept = delta * mask
    if not rescale:
        return kept
    before = delta.abs().sum()
    after = kept.abs().sum()
    if before < _NORM_EPS or after < _NORM_EPS:
        return kept
    return kept * (before / after)


def _cpu_float(magnitudes: torch.Tensor) -> torch.Tensor:
    # mergekit ranks in float32 on the CPU (argsort of half types) and in the native dtype elsewhere
    return magnitudes.float() if magnitudes.device.type == "cpu" else magnitudes


def _work_dtype(delta: torch.Tensor) -> torch.dtype:
    # torch.bernoulli lacks float16 on the CPU: there the draw runs in float32 (bfloat16 stays native)
    if delta.device.type != "cpu" or delta.dtype == torch.bfloat16:
        return delta.dtype
    return torch.float32


def magnitude(delta: torch.Tensor, density: float, rescale: bool, **_) -> torch.Tensor:
    """TIES: keep the k = max(1, int(density * n)) largest magnitudes."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    order = torch.argsort(_cpu_float(delta.abs().reshape(-1)), descending=True)
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    mask[order[:k]] = 1
    return _apply_mask(delta, mask.reshape_as(delta), rescale)


def magnitude_outliers(delta: torch.Tensor, density: float, rescale: bool, gamma: float = 0.01, **_) -> torch.Tensor:
    """Breadcrumbs: drop the top ``gamma`` fraction by magnitude, then the smallest, keeping int(density * n)."""
    if density >= 1:
        return delta
    n = delta.numel()
    keep = int(density * n)
    n_top = int(gamma * n)
    n_bottom = max(0, n - keep - n_top)
    order = torch.sort(_cpu_float(delta.abs().reshape(-1)), descending=False).indices
    mask = torch.zeros(n, dtype=delta.dtype, device=delta.device)
    mask[order[n_bottom : n_bottom + keep]] = 1
    return _apply_mask(delta, mask.reshape_as(delta), rescale)


def bernoulli(delta: torch.Tensor, density: float, rescale: bool, generator=None, **_) -> torch.Tensor:
    """DARE: keep each element with probability ``density``."""
    if density >= 1:
        return delta
    work = _work_dtype(delta)
    mask = torch.bernoulli(torch.full_like(delta, density, dtype=work), generator=generator)
    return _apply_mask(delta.to(work), mask, rescale).to(delta.dtype)


def della_magprune(delta: torch.Tensor, density: float, rescale: bool, epsilon: float = 0.15, generator=None,
                   **_) -> torch.Tensor:
    """DELLA: keep probability from density - epsilon (smallest) to density + epsilon (largest), ranked per row."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ConfigError(f"della needs 0 < density - epsilon and density + epsilon < 1 (got density={density}, "
                          f"epsilon={epsilon}): lower epsilon or change density")
    shape = delta.shape
    work = _work_dtype(delta)
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta  # 1-D (and 0-D) tensors are one row
    ranks = torch.argsort(rows.abs(), dim=1, descending=False).argsort(dim=1).to(work) + 1
    low = ranks.min(dim=1, keepdim=True).values
    high = ranks.max(dim=1, keepdim=True).values
    position = ((ranks - low) / (high - low)).clamp(0, 1)
    position = position.nan_to_num(0.5)  # one-element rows (mergekit fails there): keep with p = density
    probs = (density - epsilon) + position * 2 * epsilon
    mask = torch.bernoulli(probs, generator=generator).to(work)
    return _apply_mask(rows.to(work), mask, rescale).to(delta.dtype).reshape(shape)


SPARSIFIERS = {
    "magnitude": magnitude,
    "magnitude_outliers": magnitude_outliers,
    "random": bernoulli,
    "della_magprune": della_magprune,
}
