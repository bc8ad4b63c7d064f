"""The gguf stage's options: the recipe section ``gguf:`` and the flags of ``releaser gguf`` (no torch import here)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationInfo, field_validator, model_validator

from ..options import check_size
from ..stage import StageOptions


class GGUFOptions(StageOptions):
    """``gguf:`` -- the GGUF files of the ``-GGUF`` repo (``releaser gguf``)."""

    quants: list[str | dict[str, Any]] = Field(
        default_factory=lambda: ["Q4_K_M"], description="GGUF types, e.g. [Q8_0, Q4_K_M]; a custom recipe is a mapping "
        "{name: Q4_K_L, base: Q4_K_M, output_type: Q8_0, embedding_type: Q8_0, tensor_types: {REGEX: TYPE}, pure}, "
        "written as {Name}-{name}.gguf; a searched recipe is {name: Q4_K_R, target: {bpw: 4.9} | {size: 2.1G} | "
        "{kld: 0.03}}: a type per tensor chosen by measured sensitivity (needs imatrix).")
    split_max_size: str | None = Field(None, description="Split files above this size, e.g. 48G.")
    pre_tokenizer: str | None = Field(None, description="llama.cpp BPE pre-tokenizer name "
                                         "(default: detected by llama.cpp's hash check).")
    imatrix: str | None = Field(None, validate_default=True, description="Importance matrix file (llama-imatrix's "
                                "GGUF or legacy .dat; in a recipe also auto: computed once per release by the imatrix "
                                "stage): quantize as llama-quantize --imatrix does (Q2_K_S needs one).")
    tensor_types: dict[str, str] = Field(default_factory=dict, description="REGEX=TYPE: tensors whose GGUF name "
                                         "matches take TYPE, in every quantized file (llama-quantize's --tensor-type).")
    output_type: str | None = Field(None, description="Type of output.weight in every file (llama-quantize's "
                                    "--output-tensor-type).")
    embedding_type: str | None = Field(None, description="Type of token_embd.weight in every file (llama-quantize's "
                                       "--token-embedding-type).")
    pure: bool = Field(False, description="Every quantized tensor takes the base type: no mix rules (llama-quantize's "
                       "--pure).")

    _size = field_validator("split_max_size")(lambda v: v if v is None else check_size(v))

    @field_validator("imatrix", mode="before")
    @classmethod
    def _imatrix(cls, value: Any) -> str | None:
        if value is False or value is None:   # `imatrix: false`: none
            return None
        if not isinstance(value, str) or not value.strip() or value.strip() == "true":
            raise ValueError(f"give the path of an importance matrix file (llama-imatrix's .gguf or .dat), auto (a "
                             f"release computes it) or false; got {value!r}")
        return value.strip() if value.strip() == "auto" else value

    @field_validator("quants", mode="before")
    @classmethod
    def _quants(cls, value: Any) -> list:
        from .mixes import parse_quants

        if isinstance(value, str):
            return parse_quants(value)
        if not isinstance(value, list) or not value:
            raise ValueError("give a list of GGUF types, e.g. [Q8_0, Q4_K_M]")
        value = [parse_quants([q])[0] if isinstance(q, str) else q for q in value]
        names = [q if isinstance(q, str) else str(q.get("name")) if isinstance(q, dict) else q for q in value]
        if twice := next((n for n in names if names.count(n) > 1), None):
            raise ValueError(f"two GGUF quants are named {twice}")
        return value

    @field_validator("imatrix", mode="after")
    @classmethod
    def _needs_imatrix(cls, value: str | None, info: ValidationInfo) -> str | None:
        from .mixes import NEEDS_IMATRIX

        bases = [q if isinstance(q, str) else str(q.get("base", q.get("name", ""))).upper() if isinstance(q, dict)
                 else "" for q in info.data.get("quants", [])]
        need = [b for b in bases if b in NEEDS_IMATRIX]
        searched = [str(q.get("name")) for q in info.data.get("quants", []) if isinstance(q, dict) and "target" in q]
        if searched and value is None:
            raise ValueError(f"{searched[0]} searches a recipe, which needs an importance matrix (its errors are "
                             "weighted by it and its files made with it): set imatrix to auto or a file")
        if need and value is None:
            instead = " or ".join(dict.fromkeys(NEEDS_IMATRIX[b] for b in need))
            raise ValueError(f"{', '.join(need)} needs an importance matrix (llama-quantize refuses it without one): "
                             f"give one, or use {instead}")
        return value

    @model_validator(mode="after")
    def _recipes(self):
        self.specs()   # every entry checked now, before any work (one-line ConfigErrors naming it)
        return self

    def specs(self):
        """One :class:`~releaser.gguf.mixes.QuantSpec` per file, the section-wide overrides applied where an entry does
        not set its own."""
        from .mixes import quant_spec

        shared = {"tensor_types": self.tensor_types, "output_type": self.output_type,
                  "embedding_type": self.embedding_type, "pure": self.pure}
        return [quant_spec(q, shared) for q in self.quants]
