"""Measured quality for the quant cards: the quality report (``releaser eval -o quality.json`` / the quality stage)
read into per-file figures, matched to the GGUF files or the AWQ folder a card describes."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

NEAR_ORIGINAL_KLD = 0.01   # the pick guide's "near-original" mean-KLD bound


@dataclass(frozen=True)
class QualityRow:
    file: str            # GGUF file name or AWQ / W4A16 / MLX folder name, as in the report
    kind: str            # gguf | awq | w4a16 | mlx
    ppl: float
    ppl_ratio: float
    kld_mean: float
    kld_p99: float
    same_top: float      # fraction 0..1
    quant: str = ""      # the artefact's type: Q4_K_M, AWQ, W4A16, MLX-4bit, ...
    size: int = 0        # bytes of weights

    @property
    def same_top_pct(self) -> str:
        return f"{100 * self.same_top:.1f}%"


@dataclass(frozen=True)
class QualityFacts:
    text: str            # the evaluation text's name
    ctx: int
    chunks: int
    scored_tokens: int
    base_ppl: float
    rows: dict[str, QualityRow]
    numerics: str = "float32"   # the report's: "llama.cpp" (its CPU arithmetic) or "float32" (reports before it)

    @property
    def runtime(self) -> str:
        """One phrase naming the arithmetic the GGUF figures describe."""
        if self.numerics == "llama.cpp":
            return ("llama.cpp on a CPU computes them (each matrix product's input quantized to 8 bits as its kernels "
                    "do, attention keys and values in float16): the figures `llama-perplexity --kl-divergence` gives "
                    "against an F32 GGUF of the unquantized model")
        return ("dequantized weights and float32 activations compute them (the weights' own error; llama.cpp's "
                "8-bit activations add to it)")

    @property
    def measured_on(self) -> str:
        return (f"{self.text}, {self.chunks} windows of {self.ctx} tokens ({self.scored_tokens} scored tokens: the "
                "second half of each window)")

    def for_file(self, name: str) -> QualityRow | None:
        return self.rows.get(name)

    def folder_row(self, folder: Path, kind: str = "awq") -> QualityRow | None:
        """The report's row for a quantized folder (AWQ, W4A16, MLX): by folder name, else the only row of its kind."""
        row = self.rows.get(Path(folder).resolve().name)
        if row is not None:
            return row
        rows = [r for r in self.rows.values() if r.kind == kind]
        return rows[0] if len(rows) == 1 else None

    def awq_row(self, folder: Path) -> QualityRow | None:
        return self.folder_row(folder, "awq")


def quality_facts(report: dict | str | os.PathLike) -> QualityFacts:
    """Read a quality report (a dict, or the path of its JSON file)."""
    where = "the quality report"
    if not isinstance(report, dict):
        where = str(report)
        try:
            report = json.loads(Path(report).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"quality report {where} does not exist; make it with releaser eval -o FILE") from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"quality report {where} is not readable JSON ({exc})") from None
    try:
        rows = {r["file"]: QualityRow(str(r["file"]), str(r["kind"]), float(r["ppl"]), float(r["ppl_ratio"]),
                                      float(r["kld_mean"]), float(r["kld_p99"]), float(r["same_top"]),
                                      str(r.get("quant", "")), int(r.get("size", 0)))
                for r in report["artefacts"]}
        return QualityFacts(str(report["text"]["name"]), int(report["ctx"]), int(report["chunks"]),
                            int(report["scored_tokens"]), float(report["model"]["ppl"]), rows,
                            str(report.get("numerics", "float32")))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where} is not a releaser quality report (missing or bad {exc}); make it with "
                          "releaser eval -o FILE") from None
