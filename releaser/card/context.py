"""The variables a card template sees: front matter, titles, repo links, facts (see templates/cards/README.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..recipe import Recipe
from .facts import ModelFacts
from .quality import NEAR_ORIGINAL_KLD, QualityFacts
from .quant_facts import PREFERRED, AWQFacts, GGUFFacts, MLXFacts, W4A16Facts

Facts = ModelFacts | GGUFFacts | AWQFacts | W4A16Facts | MLXFacts
TITLE_SUFFIX = {"model": "", "gguf": " GGUF", "awq": " AWQ", "w4a16": " W4A16", "mlx": " MLX"}


def human_size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def human_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _license(facts: Facts, recipe: Recipe | None) -> str | None:
    return recipe.license if recipe else getattr(facts, "license", None)


def _main_repo(facts: Facts, recipe: Recipe | None) -> str | None:
    """The main model's repo id: the recipe's name, else (GGUF) the one base model the file names."""
    if recipe:
        return recipe.name
    bases = getattr(facts, "base_models", [])
    return bases[0] if len(bases) == 1 else None


def _front_matter(facts: Facts, recipe: Recipe | None) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    if _license(facts, recipe):
        meta["license"] = _license(facts, recipe)
    if recipe and recipe.language:
        meta["language"] = list(recipe.language)
    meta["library_name"] = {"gguf": "gguf", "mlx": "mlx"}.get(facts.kind, "transformers")
    meta["pipeline_tag"] = "text-generation"
    bits = f"{getattr(facts, 'bits', 0)}-bit"
    tags = {"model": ["merge", "mergekit"] if getattr(facts, "merge", None) else [],
            "gguf": ["gguf", "quantized"],
            "awq": ["awq", bits, "quantized"],
            "w4a16": ["compressed-tensors", "w4a16", "awq", bits, "quantized"],
            "mlx": ["mlx", bits, "quantized"]}[facts.kind]
    meta["tags"] = list(dict.fromkeys(tags + (list(recipe.tags) if recipe else [])))
    if facts.kind == "model":
        base = facts.merge.hub_models if facts.merge else []
        if base:
            meta.update(base_model=base, base_model_relation="merge")
    elif recipe:
        meta.update(base_model=[recipe.name], base_model_relation="quantized", quantized_by=recipe.author)
    elif getattr(facts, "base_models", None):
        meta.update(base_model=list(facts.base_models), base_model_relation="quantized")
        if facts.quantized_by:
            meta["quantized_by"] = facts.quantized_by
    if not meta["tags"]:
        del meta["tags"]
    return meta


def _description(facts: Facts, title: str) -> str:
    if facts.kind == "gguf":
        return f"GGUF files of {title} for llama.cpp, Ollama and other GGUF runtimes."
    if facts.kind == "awq":
        return f"{facts.bits}-bit AWQ quantization of {title} for vLLM and transformers."
    if facts.kind == "w4a16":
        return f"{facts.bits}-bit AWQ weights of {title} in the compressed-tensors format, for vLLM and SGLang."
    if facts.kind == "mlx":
        return f"{facts.bits}-bit MLX quantization of {title} for Apple silicon (mlx-lm)."
    if facts.merge:
        return (f"A merge of {len(facts.merge.models) + bool(facts.merge.base_model)} models with the "
                f"{facts.merge.method.pretty_name} method.")
    return f"A {facts.architecture} model with {human_count(facts.parameters)} parameters."


def _default_title(facts: Facts) -> str:
    if facts.kind == "gguf" and facts.name:
        return facts.name
    name = facts.folder.resolve().name
    suffix = {"gguf": "-GGUF", "awq": "-AWQ", "w4a16": "-W4A16", "mlx": f"-MLX-{getattr(facts, 'bits', 4)}BIT"}
    suffix = suffix.get(facts.kind, "")
    return name[: -len(suffix)] if suffix and name.upper().endswith(suffix) else name


def _local_id(folder: Path) -> str:
    """An unpublished folder as usage snippets name it: as given when relative, by its name when absolute (a card
    must not show the machine's absolute paths)."""
    return folder.name if folder.is_absolute() else folder.as_posix()


def _quality(facts: Facts, quality: QualityFacts | None) -> dict[str, Any] | None:
    """Measured figures for a quant card: per GGUF file (and the pick guide's near-original choice), or the AWQ row."""
    if quality is None or facts.kind == "model":
        return None
    if facts.kind in ("awq", "w4a16", "mlx"):
        row = quality.folder_row(facts.folder, facts.kind)
        return {"report": quality, "row": row} if row else None
    files = {f.name: quality.for_file(f.name) for f in facts.files}
    if not any(files.values()):
        return None
    close = [f for f in facts.files if files[f.name] and files[f.name].kld_mean < NEAR_ORIGINAL_KLD]
    near = min(close, key=lambda f: f.size, default=None)
    return {"report": quality, "files": files, "pick": files.get(facts.recommended.name),
            "near_original": near, "near_original_kld": NEAR_ORIGINAL_KLD}


def _models_ini(facts: Facts, recipe: Recipe | None, repo: str | None) -> str | None:
    """The llama-server models.ini stanza of a GGUF card (recipe ``runtimes.llama_server``, a published repo)."""
    if facts.kind != "gguf" or repo is None or (recipe and not recipe.runtimes.llama_server):
        return None
    from ..runtimes.files import GGUF_SAMPLING, models_ini

    sampling = {name: float(facts.sampling[key]) if "." in facts.sampling[key] else int(facts.sampling[key])
                for key, name in GGUF_SAMPLING.items() if key in facts.sampling}
    return models_ini(sampling, repo, facts.recommended.quant_type)


FORMAT_OF = {"model": "original weights (safetensors)", "gguf": "GGUF for llama.cpp, Ollama and LM Studio",
             "awq": "AWQ (AutoAWQ GEMM) for vLLM and transformers",
             "w4a16": "W4A16 (compressed-tensors) for vLLM, SGLang and transformers",
             "mlx": "MLX for Apple silicon (mlx-lm, LM Studio)"}


def _versions(recipe: Recipe | None, quality: QualityFacts | None) -> list[dict[str, Any]]:
    """The "Available versions" rows: each repo of the release with its format and, from the quality report, the
    figures of what it holds (a GGUF repo: its recommended type's file) on the same text."""
    if recipe is None:
        return []
    rows = []
    repos = [("model", recipe.name), *((k, v) for k, v in recipe.quants.model_dump().items() if v)]
    for kind, repo in repos:
        row = None
        if quality is not None and kind == "gguf":
            by_quant = {r.quant: r for r in quality.rows.values() if r.kind == "gguf"}
            row = next((by_quant[q] for q in PREFERRED if q in by_quant), None)
        elif quality is not None and kind != "model":
            row = quality.rows.get(repo.split("/", 1)[1])
        rows.append({"repo": repo, "kind": kind, "format": FORMAT_OF[kind], "row": row})
    return rows


def card_context(facts: Facts, recipe: Recipe | None, quality: QualityFacts | None = None) -> dict[str, Any]:
    """The variables a card template sees (documented in templates/cards/README.md)."""
    from huggingface_hub import ModelCardData

    meta = _front_matter(facts, recipe)
    base_title = recipe.title if recipe else _default_title(facts)
    repo = (recipe.name if facts.kind == "model" else getattr(recipe.quants, facts.kind)) if recipe else None
    return {
        "front_matter": ModelCardData(**meta).to_yaml(),
        "meta": meta,
        "facts": facts,
        "title": base_title + TITLE_SUFFIX[facts.kind],
        "base_title": base_title,
        "description": recipe.description if recipe else _description(facts, base_title),
        "license": _license(facts, recipe),
        "repo": repo,                                  # this card's repo id (None: no recipe, not published)
        "model_id": repo or _local_id(facts.folder),   # what usage snippets load
        "main_repo": _main_repo(facts, recipe),
        "gguf_repo": recipe.quants.gguf if recipe else None,
        "awq_repo": recipe.quants.awq if recipe else None,
        "w4a16_repo": recipe.quants.w4a16 if recipe else None,
        "mlx_repo": recipe.quants.mlx if recipe else None,
        "versions": _versions(recipe, quality),        # the "Available versions" table (main repo first)
        # the quality report the versions' figures are from (none without one, or when it measured none of them)
        "versions_report": quality if any(v["row"] for v in _versions(recipe, quality)) else None,
        "sections": list(recipe.sections) if recipe else [],
        "releases": list(recipe.releases) if recipe else [],
        "quality": _quality(facts, quality),           # measured figures (None without a quality report)
        "models_ini": _models_ini(facts, recipe, repo),   # llama-server preset stanza (GGUF cards)
    }
