"""The ``tokenizer`` stage: ``run(options, inputs, out, reporter) -> StageResult``, the release's main folder."""

from __future__ import annotations

import os
from pathlib import Path

from ..atomic import output_dir
from ..stage import Reporter, StageResult, describe_files
from .options import TokenizerOptions


def run(options: TokenizerOptions | None, inputs: str | os.PathLike, out: str | os.PathLike,
        reporter: Reporter | None = None, *, link: bool = False, overwrite: bool = False,
        describe=describe_files) -> StageResult:
    """The model folder ``inputs`` in ``out`` with the chat template and stop tokens ``options`` asks for (its
    ``template``: a built-in name or a file's path), or as it is (None; its README.md left out). ``link``: hard-link
    the unchanged files (``inputs`` is releaser's own output, not the user's)."""
    out = Path(out)
    if options is None:
        from .output import _copy_into

        with output_dir(out, overwrite=overwrite) as tmp:
            _copy_into(Path(inputs), tmp, {}, skip_weights=False, skip={"README.md"}, link=link)
        return StageResult("tokenizer", out, describe(out), "copied the model as it is (no tokenizer: section)")
    from .fix import FixSpec, fix_tokenizer

    report = fix_tokenizer(inputs, FixSpec(options.template, out, False, options.end_of_turn,
                                           options.system_prompt, overwrite=overwrite, link=link,
                                           stops=tuple(options.extra_stops)))
    return StageResult("tokenizer", out, describe(out),
                       f"{report.template}: eos {report.eos_token!r}, stop ids {report.eos_ids}, "
                       f"{len(report.changes)} file(s) changed", facts={"changes": report.changes,
                                                                        "stop_strings": report.stop_strings})
