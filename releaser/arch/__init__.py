"""Architectures as data: one description per model family (``base.Architecture``), a module per family, and this
registry. Every stage finds its family with ``architecture_for(config, where, stage)``.

Adding a family: describe it in a module here (HF classes, GGUF arch, transforms, hooks), add it to ``FAMILIES``,
and add it to the parametrized tests in tests/test_arch_families.py (GGUF vs llama.cpp, logits, merge vs mergekit)."""

from __future__ import annotations

from ..errors import ModelError
from . import gemma, llama, olmo, phi, qwen, smollm
from .base import STAGES, Architecture, permute_qk, rope_parameters, unpermute_qk

FAMILIES: list[Architecture] = [*llama.FAMILIES, *qwen.FAMILIES, *gemma.FAMILIES, *phi.FAMILIES, *olmo.FAMILIES,
                                *smollm.FAMILIES]


def supported_names(stage: str | None = None) -> list[str]:
    """HF class names releaser handles (in ``stage``, or in some stage)."""
    return [c for a in FAMILIES if stage is None or a.supports(stage) for c in a.classes]


def find_family(config: dict) -> Architecture | None:
    """The family of ``config`` (a config.json dict), None when releaser does not know it."""
    classes = config.get("architectures") or []
    model_type = config.get("model_type")
    for arch in FAMILIES:
        if any(c in arch.classes for c in classes) or (not classes and model_type in arch.model_types):
            return arch
    return None


def architecture_for(config: dict, where: str = "the model", stage: str | None = None) -> Architecture:
    """The family of ``config`` (a config.json dict); a ModelError naming the family and the supported list when
    releaser does not know it, or when ``stage`` does not handle it yet."""
    arch = find_family(config)
    if arch is None:
        found = ", ".join(config.get("architectures") or []) or config.get("model_type") or "none given"
        raise ModelError(f"unsupported architecture {found} in {where}'s config.json; "
                         f"releaser supports {', '.join(supported_names(stage))}")
    if stage is not None and not arch.supports(stage):
        raise ModelError(f"{arch.label} ({arch.classes[0]}, {where}) is not supported by {stage} yet; "
                         f"{stage} supports {', '.join(supported_names(stage))}")
    return arch


def family_label(config: dict) -> str | None:
    """``"Qwen3"`` etc., or None for a family releaser does not know."""
    arch = find_family(config)
    return arch.label if arch else None


def stage_summary(config: dict) -> str:
    """One line for doctor: the family of ``config`` and which stages handle it."""
    arch = find_family(config)
    if arch is None:
        found = ", ".join(config.get("architectures") or []) or config.get("model_type") or "none given"
        return f"architecture {found} is not one releaser knows; it supports {', '.join(supported_names())}"
    missing = [s for s in STAGES if not arch.supports(s)]
    return (f"family {arch.label} ({arch.classes[0]}): {', '.join(arch.stages)}"
            + (f"; not yet: {', '.join(missing)}" if missing else " (every stage)"))


__all__ = ["FAMILIES", "STAGES", "Architecture", "architecture_for", "family_label", "find_family", "permute_qk",
           "rope_parameters", "stage_summary", "supported_names", "unpermute_qk"]
