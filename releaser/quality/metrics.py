"""Perplexity and KL divergence as llama.cpp's perplexity tool defines them (``--kl-divergence-base`` /
``--kl-divergence``, tools/perplexity/perplexity.cpp):

- the text is cut into windows of ``ctx`` tokens; in each only the second half is scored: the logits at positions
  ctx/2 .. ctx-2 predict the tokens ctx/2+1 .. ctx-1 (the first half only gives the scored tokens context);
- perplexity = exp(mean negative log-likelihood of the scored tokens);
- per scored token, KLD = sum_v p_base(v) * (log p_base(v) - log p_quant(v)), summed over the tokens whose base
  log-probability is above -16 (llama.cpp's cut-off); mean, 99th percentile (linear interpolation between sorted
  values, as llama.cpp's ``percentile``) and maximum over all scored tokens;
- "same top" = the share of scored tokens where both models' most likely next token is the same.

The unquantized model runs first and keeps its log-probabilities of the scored positions in a file (``BaseLogProbs``,
a .npy array [windows, scored, vocab] float32, read back one window at a time), so only one model is ever in memory.
llama.cpp stores them as 16-bit values; float32 keeps the KLD of the model against itself exactly 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .text import Windows

LOG_PROB_FLOOR = -16.0   # llama.cpp: base log-probabilities at or below this do not enter the KLD sum

# run(tokens [n, ctx]) -> per window, in order, the logits of its scored positions (ctx/2 .. ctx-2) as consecutive row
# blocks [rows, vocab] (blocks keep the float temporaries of a 100k+ vocabulary small)
ScoredLogits = Callable[[torch.Tensor], Iterable[Iterable[torch.Tensor]]]


@dataclass(frozen=True)
class Figures:
    """Quality figures of one model over the scored tokens of the evaluation windows."""

    ppl: float
    tokens: int                       # scored tokens
    windows: int
    kld_mean: float | None = None     # None for the unquantized model itself
    kld_p99: float | None = None
    kld_max: float | None = None
    same_top: float | None = None     # fraction 0..1
    ppl_ratio: float | None = None    # PPL(quant) / PPL(base)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


class BaseLogProbs:
    """The unquantized model's log-probabilities of the scored positions, in a .npy file written window by window."""

    def __init__(self, path: Path, windows: int, scored: int, vocab: int):
        self.path, self.shape = Path(path), (windows, scored, vocab)
        self._offset: int | None = None

    def write(self, blocks) -> None:
        """Write the file from an iterable of [rows, vocab] float32 blocks, all windows' rows in order."""
        with open(self.path, "wb") as fh:
            np.lib.format.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False, "shape": self.shape})
            self._offset = fh.tell()
            rows = 0
            for block in blocks:
                block = np.ascontiguousarray(block, dtype="<f4")
                if block.ndim != 2 or block.shape[1] != self.shape[2]:
                    raise ValueError(f"block of shape {block.shape}, expected [rows, {self.shape[2]}]")
                block.tofile(fh)
                rows += block.shape[0]
            if rows != self.shape[0] * self.shape[1]:
                raise ValueError(f"wrote {rows} rows, expected {self.shape[0] * self.shape[1]}")

    def read(self, window: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of window ``window`` ([rows, vocab] float32), read with plain file I/O (no memory map:
        RSS stays one block)."""
        if self._offset is None:
            with open(self.path, "rb") as fh:
                np.lib.format.read_magic(fh)
                np.lib.format.read_array_header_1_0(fh)
                self._offset = fh.tell()
        stop = self.shape[1] if stop is None else stop
        vocab = self.shape[2]
        with open(self.path, "rb") as fh:
            fh.seek(self._offset + ((window * self.shape[1] + start) * vocab) * 4)
            data = np.fromfile(fh, dtype="<f4", count=(stop - start) * vocab)
        return torch.from_numpy(data).view(stop - start, vocab)


class NonFiniteLogits(ValueError):
    """A model gave NaN or infinite logits: its figures would be NaN (and a NaN passes every limit)."""


def _finite(logits: torch.Tensor, window: int) -> torch.Tensor:
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteLogits(f"non-finite logits (NaN or infinity) in evaluation window {window + 1}")
    return logits


def log_softmax_(logits: torch.Tensor) -> torch.Tensor:
    """log-softmax in place (float32)."""
    logits = logits.to(torch.float32)
    return logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))


def _nll(lp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -lp.gather(1, targets.view(-1, 1)).squeeze(1).to(torch.float64)


def score_base(run: ScoredLogits, windows: Windows, store: BaseLogProbs,
               advance: Callable[..., None] = lambda n=1: None) -> Figures:
    """Perplexity of the unquantized model; writes its scored log-probabilities to ``store``."""
    nll: list[torch.Tensor] = []

    def blocks():
        for i, window in enumerate(run(windows.tokens)):
            row = 0
            for logits in window:
                lp = log_softmax_(_finite(logits, i))
                nll.append(_nll(lp, windows.targets[i, row: row + lp.shape[0]]))
                row += lp.shape[0]
                yield lp.numpy()
            advance()

    store.write(blocks())
    values = torch.cat(nll)
    return Figures(ppl=math.exp(values.mean().item()), tokens=values.numel(), windows=windows.count)


def score_against(run: ScoredLogits, windows: Windows, store: BaseLogProbs, base_ppl: float,
                  advance: Callable[..., None] = lambda n=1: None) -> Figures:
    """Perplexity of a quantized model and its KL divergence from the unquantized one (``store``)."""
    nll, kld, same = [], [], 0
    for i, window in enumerate(run(windows.tokens)):
        row = 0
        for logits in window:
            lp = log_softmax_(_finite(logits, i))
            if lp.shape[1] != store.shape[2]:
                raise ValueError(f"the artefact's vocabulary has {lp.shape[1]} entries, the unquantized model's "
                                 f"{store.shape[2]}")
            base = store.read(i, row, row + lp.shape[0])
            nll.append(_nll(lp, windows.targets[i, row: row + lp.shape[0]]))
            kld.append(kl_divergence(base, lp))
            same += int((base.argmax(-1) == lp.argmax(-1)).sum())
            row += lp.shape[0]
        if row != store.shape[1]:
            raise ValueError(f"the artefact gave {row} scored positions, expected {store.shape[1]}")
        advance()
    values = torch.cat(nll)
    k = torch.cat(kld).numpy()
    ppl = math.exp(values.mean().item())
    return Figures(ppl=ppl, tokens=values.numel(), windows=windows.count, kld_mean=float(k.mean()),
                   kld_p99=float(np.percentile(k, 99.0)), kld_max=float(k.max()), same_top=same / k.size,
                   ppl_ratio=ppl / base_ppl)


def kl_divergence(base_lp: torch.Tensor, lp: torch.Tensor, rows: int = 32) -> torch.Tensor:
    """KLD(base || quant) per row [n] (float64), over the entries with base log-probability above -16; ``rows`` rows
    at a time to keep the float64 temporaries small."""
    out = []
    for b, q in zip(base_lp.split(rows), lp.split(rows)):
        b64 = b.to(torch.float64)
        terms = b64.exp() * (b64 - q.to(torch.float64))
        out.append(torch.where(b > LOG_PROB_FLOOR, terms, 0.0).sum(-1))
    return torch.cat(out)
