"""The ``runtimes`` stage: ``run(options, inputs, out, reporter) -> StageResult``, the runtime files of the GGUF repo
folder (Ollama's ``params``, ``system`` and ``template``, LM Studio's ``model.yaml``), each written atomically; a file the options
no longer ask for is removed."""

from __future__ import annotations

import os
from pathlib import Path

from ..atomic import os_error, write_file
from ..stage import Reporter, StageResult, describe_files
from .files import FILES, runtime_facts, write_plan
from .options import RuntimesOptions


def run(options: RuntimesOptions, inputs: tuple[str | os.PathLike, str | os.PathLike], out: str | os.PathLike,
        reporter: Reporter | None = None, *, main_repo: str, gguf_repo: str, system_prompt: str | None = None,
        chat_template: str | None = None, describe=describe_files) -> StageResult:
    """Write the runtime files ``options`` turns on into ``out`` (the GGUF repo folder), from ``inputs`` = (the main
    folder, the GGUF folder): stops and sampling defaults from the main folder, sizes and metadata from the GGUFs;
    ``chat_template`` is the recipe's ``tokenizer.template`` (None: the model keeps its own)."""
    from ..tokenizer.templates import load_template

    main_dir, gguf_dir = (Path(p) for p in inputs)
    out = Path(out)
    facts = runtime_facts(main_dir, gguf_dir, system_prompt, load_template(chat_template) if chat_template else None)
    plan = write_plan(facts, options, main_repo, gguf_repo)
    written = [write_file(out / name, text) for name, text in plan.items()]
    for name in FILES:
        if name not in plan and (out / name).is_file():
            try:
                (out / name).unlink()
            except OSError as exc:
                raise os_error(exc, out / name) from exc
    summary = f"{len(written)} runtime file(s): {', '.join(plan) or 'none'} (stops: {', '.join(facts.stops)})"
    return StageResult("runtimes", out, describe(out, written), summary,
                       {"stops": facts.stops, "sampling": facts.sampling, "ollama_template": facts.ollama_note})
