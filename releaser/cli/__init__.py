"""The ``releaser`` command line: thin wrappers around the Python API; errors become one-line messages. All terminal
code lives in this package: the commands (here), the rich reporter (``ui``), failure reports (``failures``) and the
tokenizer and publish commands' console output (``tokenizer``, ``publish``); the library never prints."""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import click
import typer
from rich.console import Console
from rich.markup import escape

from ..atomic import release_all
from ..awq.options import AWQOptions
from ..errors import ReleaserError
from ..formats.options import MLXOptions
from ..gguf.options import GGUFOptions
from ..imatrix.options import ImatrixOptions
from ..merge.options import MergeOptions
from ..publish.options import PublishOptions
from ..quality.options import QualityOptions
from ..tokenizer.options import TokenizerOptions
from .failures import Terminated, foreseen, one_line, unforeseen

app = typer.Typer(
    name="releaser",
    help="Turn one recipe into a finished model release: merge weights, fix tokenizers, export GGUF, render cards.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()


def _fail(message: str, code: int) -> typer.Exit:
    console.print(f"[bold red]error:[/] {escape(one_line(message))}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def friendly(fn):
    """Every failure ends in one line and a non-zero exit code: ReleaserError (bad input), OS and library errors
    (disk full, permissions, broken files), Ctrl-C and SIGTERM; anything else also names a full report's file."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ReleaserError as exc:
            raise _fail(str(exc), exc.exit_code) from None
        except KeyboardInterrupt as exc:   # Ctrl-C, or SIGTERM (Terminated)
            release_all()
            word, code = ("terminated", 143) if isinstance(exc, Terminated) else ("interrupted", 130)
            console.print(f"[bold red]{word}[/]: nothing partial was left under the output name")
            raise typer.Exit(code) from None
        except (typer.Exit, typer.Abort, click.exceptions.ClickException):
            raise
        except Exception as exc:  # noqa: BLE001 - the one place that turns any failure into one line
            message = foreseen(exc)
            if message is not None:
                raise _fail(message, 1) from None
            raise _fail(unforeseen(exc), 70) from None

    return wrapper


def _terminate(signum, frame) -> None:
    raise Terminated()


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        out.print(f"releaser {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print releaser's version and exit.")) -> None:
    """releaser: merge, fix, quantize, document and publish model releases."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)  # SIGTERM cleans up like Ctrl-C


STRICT_HELP = "Every warning is an error (a merge parameter the method ignores, a filter that matches nothing)."


def flag(*names: str, help: str):
    """An on/off option: given or not, without a value (help shows no <bool>, so nobody types --overwrite true)."""
    return typer.Option(False, *names, help=help, metavar="", show_default=False)


def option(model, name: str, *names: str, **settings):
    """A flag that sets the options model's field ``name``: its default and help come from the model (stated once)."""
    settings.setdefault("help", model.help(name))
    return typer.Option(model.default(name), *names, **settings)


def _reporter(quiet: bool = False):
    from .ui import RichReporter

    return RichReporter(console, quiet=quiet)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


@app.command()
@friendly
def merge(
    config: Path = typer.Argument(..., metavar="CONFIG", help="mergekit-style YAML merge config (models or slices, merge_method, ...)."),
    out_dir: Path | None = typer.Argument(None, metavar="OUT_DIR", help="Folder to write the merged model to (written atomically)."),
    device: str = option(MergeOptions, "device"),
    overwrite: bool = flag("--overwrite", help="Replace OUT_DIR if it exists."),
    shard_size: str = option(MergeOptions, "shard_size"),
    quiet: bool = flag("--quiet", "-q", help="No progress bar."),
    dry_run: bool = flag("--dry-run", help="Print the plan (per tensor group: method, sources, "
                         "parameters per layer) and write nothing."),
    strict: bool = flag("--strict", help=STRICT_HELP),
) -> None:
    """Merge models with a mergekit YAML config; the output equals mergekit's."""
    import gc

    from ..errors import ConfigError

    gc.disable()   # importing torch makes ~10^6 long-lived objects: collecting while it runs only costs time
    try:
        from ..checkpoint import parse_size
        from ..merge import run_merge
    finally:
        gc.enable()

    if dry_run:
        from ..merge.describe import dry_run as describe

        out.print("\n".join(describe(config)), highlight=False, markup=False, soft_wrap=True)
        return
    if out_dir is None:
        raise ConfigError("merge needs OUT_DIR, the folder to write the merged model to (or --dry-run)")
    result = run_merge(config, out_dir, device=device, overwrite=overwrite, max_shard_bytes=parse_size(shard_size),
                       reporter=_reporter(quiet), strict=strict)
    out.print(f"[green]merged[/] {result.tensors} tensors ({_human(result.bytes_written)}) with {result.method} "
              f"in {result.seconds:.1f} s -> {result.out_dir} ({', '.join(result.files)})", highlight=False)


@app.command()
@friendly
def card(
    model_dir: Path = typer.Argument(..., metavar="MODEL_DIR", help="Model folder: merged/HF, GGUF files or AWQ."),
    recipe: Path | None = typer.Option(None, "--recipe", "-r", help="Release recipe YAML (name, license, ...)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write the card here (default: stdout)."),
    template: Path | None = typer.Option(None, "--template", "-t", help="Your own Jinja2 card template."),
    overwrite: bool = flag("--overwrite", help="Replace an existing --output file."),
    quality: Path | None = typer.Option(None, "--quality", help="Quality report from releaser eval: adds PPL, KLD "
                                        "and same-top figures to GGUF and AWQ cards."),
) -> None:
    """Render a model card (README.md) from what MODEL_DIR contains and the recipe."""
    from ..card import render_card, write_card
    from ..recipe import load_recipe

    spec = load_recipe(recipe) if recipe else None
    if output is None:
        sys.stdout.write(render_card(model_dir, spec, template, quality))
        return
    result = write_card(model_dir, output, spec, template, overwrite=overwrite, inputs=(recipe,), quality=quality)
    console.print(f"[green]card[/] ({result.kind}, {result.bytes} bytes, template {result.template.name}) "
                  f"-> {result.path}", highlight=False)


@app.command()
@friendly
def doctor(
    model_dir: Path = typer.Argument(..., metavar="MODEL_DIR", help="Hugging Face model folder to check."),
    template: str | None = typer.Option(None, "--template", "-t", help="Chat format it should have: a built-in "
                                        "name (chatml, llama2, llama3, mistral, alpaca, vicuna, zephyr, gemma, phi3) "
                                        "or a .jinja file."),
    as_json: bool = flag("--json", help="Print the findings as JSON."),
) -> None:
    """Find why a model would not stop generating: eos, generation_config, pad, template, special tokens, rows."""
    from .tokenizer import run_doctor

    raise typer.Exit(run_doctor(model_dir, template, as_json, Console(soft_wrap=as_json)))


@app.command("fix-tokenizer")
@friendly
def fix_tokenizer_cmd(
    model_dir: Path = typer.Argument(..., metavar="MODEL_DIR", help="Hugging Face model folder to fix."),
    template: str = typer.Option(..., "--template", "-t", help=TokenizerOptions.help("template")),
    out_dir: Path | None = typer.Option(None, "--output", "-o", help="Write a fixed copy to this folder."),
    in_place: bool = flag("--in-place", help="Change MODEL_DIR itself (only the changed files)."),
    eos: list[str] | None = typer.Option(None, "--eos", help="End-of-turn token (default: the template's, else the "
                                         "eos); repeat it to add more tokens that end generation, e.g. --eos "
                                         "'<|im_end|>' --eos '<|endoftext|>'."),
    system_prompt: str | None = option(TokenizerOptions, "system_prompt", "--system-prompt"),
    overwrite: bool = flag("--overwrite", help="Replace OUT_DIR if it exists."),
) -> None:
    """Set the chat template and fix eos, generation_config, pad, special tokens, BOS and untrained rows."""
    from .tokenizer import run_fix
    from ..tokenizer.fix import FixSpec

    opts = TokenizerOptions.build(template=template, eos=(eos[0] if len(eos) == 1 else eos) if eos else None,
                                  system_prompt=system_prompt)
    run_fix(model_dir, FixSpec(opts.template, out_dir, in_place, opts.end_of_turn, opts.system_prompt, overwrite,
                               stops=tuple(opts.extra_stops)), Console())


@app.command("gguf", context_settings={"allow_extra_args": True})
@friendly
def gguf_cmd(
    model_dir: Path = typer.Argument(..., metavar="MODEL_DIR", help="Hugging Face model folder: Llama, Mistral, "
                                     "Qwen2, Qwen3, Qwen3-MoE, Gemma 2, Gemma 3 (text), Phi-3, OLMo 2 or SmolLM3."),
    out_dir: Path = typer.Option(..., "--output", "-o", help="Folder for the .gguf files (created if missing)."),
    quant: str = typer.Option(",".join(GGUFOptions.default("quants")), "--quant", "-Q", help="Comma-separated types: F32, F16, BF16, Q8_0, Q4_0, "
                              "Q4_1, Q5_0, Q5_1, Q2_K, Q2_K_S (needs --imatrix), Q3_K_S, Q3_K_M, Q3_K_L, Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M, Q6_K, "
                              "IQ4_NL, IQ4_XS, IQ3_S, IQ3_M; with --imatrix also IQ3_XS, IQ3_XXS, IQ2_M, IQ2_S, "
                              "IQ2_XS, IQ2_XXS, IQ1_M, IQ1_S (the recipe's gguf.quants)."),
    name: str | None = typer.Option(None, "--name", help="Model name: general.name and the file names {Name}-{TYPE}."),
    split_max_size: str | None = option(GGUFOptions, "split_max_size", "--split-max-size"),
    license: str | None = typer.Option(None, "--license", help="general.license (default: from the model card)."),
    base_model: list[str] | None = typer.Option(None, "--base-model", help="Base model repo id (repeatable)."),
    tag: list[str] | None = typer.Option(None, "--tag", help="general.tags entry (repeatable)."),
    quantized_by: str | None = typer.Option(None, "--quantized-by", help="general.quantized_by."),
    pre_tokenizer: str | None = option(GGUFOptions, "pre_tokenizer", "--pre-tokenizer"),
    tensor_type: list[str] | None = typer.Option(None, "--tensor-type", metavar="REGEX=TYPE", help="Tensors whose "
                                                 "GGUF name matches REGEX take TYPE (repeatable; the first match "
                                                 "wins; llama-quantize's --tensor-type)."),
    output_tensor_type: str | None = option(GGUFOptions, "output_type", "--output-tensor-type"),
    token_embedding_type: str | None = option(GGUFOptions, "embedding_type", "--token-embedding-type"),
    pure: bool = flag("--pure", help=GGUFOptions.help("pure")),
    imatrix: str | None = option(GGUFOptions, "imatrix", "--imatrix", metavar="FILE"),
    overwrite: bool = flag("--overwrite", help="Replace existing files of the same names."),
    quiet: bool = flag("--quiet", "-q", help="No progress bar."),
    ctx: typer.Context = None,
) -> None:
    """Export GGUF files (one pass over the checkpoint; llama-quantize's mixes, same bytes as llama.cpp)."""
    from ..errors import ConfigError
    from ..gguf import export_gguf

    stray = ctx.args if ctx is not None else []
    if stray:  # releaser <= 0.1 used -q for --quant: `-q Q8_0` now reads as --quiet plus a stray argument
        hint = " (-q means --quiet in every command; the types go with --quant/-Q)" if quiet else ""
        raise ConfigError(f"unexpected argument {stray[0]!r}{hint}; e.g. --quant {stray[0]}")

    pairs = {}
    for item in tensor_type or []:
        pattern, sep, qtype = item.partition("=")
        if not sep or not pattern or not qtype:
            raise ConfigError(f"--tensor-type {item!r}: give REGEX=TYPE, e.g. --tensor-type attn_v=q8_0")
        pairs[pattern] = qtype
    opts = GGUFOptions.build(quants=quant, split_max_size=split_max_size, pre_tokenizer=pre_tokenizer,
                             tensor_types=pairs, output_type=output_tensor_type, embedding_type=token_embedding_type,
                             pure=pure, imatrix=imatrix)
    result = export_gguf(model_dir, out_dir, opts.specs(), name, opts.split_max_size, overwrite=overwrite,
                         license=license, tags=tag, base_models=base_model, quantized_by=quantized_by,
                         pre_tokenizer=opts.pre_tokenizer, imatrix=opts.imatrix, reporter=_reporter(quiet))
    out.print(result.summary(), highlight=False)


@app.command("gguf-fix")
@friendly
def gguf_fix_cmd(
    file: Path = typer.Argument(..., metavar="FILE.gguf", help="GGUF file to fix (in place unless --output)."),
    chat_template: Path | None = typer.Option(None, "--chat-template", help="File with the new Jinja chat template."),
    eos: str | None = typer.Option(None, "--eos", help="Text of the new eos token, e.g. <|im_end|>."),
    name: str | None = typer.Option(None, "--name", help="New general.name."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write the fixed file here instead."),
    overwrite: bool = flag("--overwrite", help="Replace an existing --output file."),
) -> None:
    """Rewrite a GGUF's chat template, eos or name without requantizing (tensor bytes are copied unchanged)."""
    from ..errors import ConfigError
    from ..gguf.fix import fix_gguf

    template = None
    if chat_template is not None:
        try:
            template = chat_template.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read the chat template {chat_template} ({exc.strerror or exc})") from exc
    result = fix_gguf(file, chat_template=template, eos=eos, name=name, out=output, overwrite=overwrite)
    out.print(result.summary(), highlight=False)


@app.command("publish")
@friendly
def publish_cmd(
    release_dir: Path = typer.Argument(..., metavar="RELEASE_DIR", help="Folder with one folder per repo, named like "
                                       "the repos (Name, Name-GGUF, Name-AWQ); with --repo, that repo's folder."),
    to: str = option(PublishOptions, "target", "--to"),
    repo: str | None = typer.Option(None, "--repo", help="Repo id OWNER/NAME of a single folder."),
    recipe: Path | None = typer.Option(None, "--recipe", "-r", help="Release recipe: repo ids (name, quants.gguf, "
                                       "quants.awq), version (tag) and notes (commit description)."),
    private: bool = flag("--private", help=PublishOptions.help("private")),
    dry_run: bool = flag("--dry-run", help=PublishOptions.help("dry_run")),
    create_pr: bool = flag("--create-pr", help=PublishOptions.help("create_pr")),
    message: str | None = option(PublishOptions, "message", "--message", "-m"),
    keep_stale: bool = flag("--keep-stale", help=PublishOptions.help("keep_stale")),
    include_untracked: bool = flag("--include-untracked", help=PublishOptions.help("include_untracked")),
    quiet: bool = flag("--quiet", "-q", help="No progress bars (hashing, uploads) and no progress lines."),
) -> None:
    """Publish a release: plan each repo, send only what changed, delete what is stale, tag, verify."""
    from .publish import publish_options, release_repos, run_publish_cli

    repos, facts = release_repos(release_dir, recipe, repo)
    options = publish_options(target=to, private=private, dry_run=dry_run, create_pr=create_pr, message=message,
                              keep_stale=keep_stale, include_untracked=include_untracked, **facts)
    run_publish_cli(options, repos, out, console, quiet)


def _stage_table(stages, title: str):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in ("stage", "status", "why", "result"):
        table.add_column(col, overflow="fold")
    style = {"ran": "green", "skipped": "dim", "would run": "yellow", "runs": "green"}
    for s in stages:
        what = s.summary
        if s.files:
            what += f" ({s.files} files, {_human(s.bytes)}" + (f", {s.seconds:.1f} s)" if s.seconds else ")")
        table.add_row(s.name, f"[{style.get(s.status, 'dim')}]{s.status}[/]", s.reason, what)
    return table


def _stages(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@app.command()
@friendly
def release(
    recipe: Path = typer.Argument(..., metavar="RECIPE", help="Release recipe YAML (see recipes/example.yml)."),
    work_dir: Path = typer.Option(Path("release"), "--output", "-o", help="Work folder: the repo folders "
                                  "(NAME, NAME-GGUF, ...), merged/ and the manifest release.json."),
    push: bool = flag("--push", help="Publish to the Hugging Face Hub (default: the recipe's "
                              "publish.target, local folders unless it says hub)."),
    only: str | None = typer.Option(None, "--only", help="Run only these stages (comma-separated)."),
    skip: str | None = typer.Option(None, "--skip", help="Leave these stages out (comma-separated)."),
    force: bool = flag("--force", help="Run every stage again, even when up to date."),
    dry_run: bool = flag("--dry-run", help="Show which stages would run and why; change nothing."),
    quiet: bool = flag("--quiet", "-q", help="No progress bars."),
    strict: bool = flag("--strict", help=STRICT_HELP),
    executor: str | None = typer.Option(None, "--executor", help="Where the tasks run: local (this process, the "
                                        "default) or ray (a Ray cluster; the work folder must be on a file system "
                                        "every node mounts). Default: the recipe's executor.kind."),
    ray_address: str | None = typer.Option(None, "--ray-address", metavar="ADDR", help="The Ray cluster to use "
                                           "(with --executor ray; default: the recipe's executor.address, "
                                           "RAY_ADDRESS, or a Ray started here)."),
) -> None:
    """Make the whole release a recipe describes: merge, fix tokenizer, verify, GGUF, cards, publish; reruns skip
    what is up to date."""
    from ..pipeline import run_release

    result = run_release(recipe, work_dir, only=_stages(only), skip=_stages(skip), force=force, dry_run=dry_run,
                         push=push, reporter=_reporter(quiet), strict=strict, executor=executor,
                         ray_address=ray_address)
    out.print(_stage_table(result.stages, f"release {result.work}" + (" (dry run)" if dry_run else "")))
    if not dry_run:
        ran = result.ran
        out.print(f"[green]release[/] {len(ran)} stage(s) ran ({', '.join(ran) or 'none: everything up to date'}); "
                  f"folders: {', '.join(str(p) for p in result.folders.values())}; manifest "
                  f"{result.work / 'release.json'}", highlight=False)


@app.command()
@friendly
def check(recipe: Path = typer.Argument(..., metavar="RECIPE", help="Release recipe YAML."),
          strict: bool = flag("--strict", help=STRICT_HELP)) -> None:
    """Validate a recipe offline with every check release makes before its first stage, and print the stages it
    would run."""
    from ..pipeline import check_recipe

    result = check_recipe(recipe, strict=strict)
    reporter = _reporter()
    for text in result.warnings:
        reporter.warning(text)
    out.print(_stage_table(result.stages, f"{recipe}: {result.recipe.name} {result.recipe.version}"))
    family = f"model family {result.family}" if result.family else "model family known once the Hub models are read"
    out.print(f"[green]ok[/]: {recipe} is a valid recipe; {escape(family)}", highlight=False)


@app.command()
@friendly
def verify(work_dir: Path = typer.Argument(..., metavar="WORK", help="A release's work folder (with release.json)."),
           quiet: bool = flag("--quiet", "-q", help="No progress bar.")) -> None:
    """Read again every file release.json records and list those that changed or are missing (exit 1 if any)."""
    from ..pipeline.verify import verify_release

    result = verify_release(work_dir, _reporter(quiet))
    for m in result.mismatches:
        out.print(f"[red]{m.stage}[/]: {escape(m.path)}: {escape(m.problem)}", highlight=False)
    if result.mismatches:
        raise _fail(f"{len(result.mismatches)} of {result.files} recorded file(s) differ from "
                    f"{result.work / 'release.json'}; rebuild them with `releaser release RECIPE -o {work_dir} "
                    f"--only {','.join(result.stages)} --force`", 1)
    out.print(f"[green]ok[/]: {result.files} file(s), {_human(result.bytes)}, match {result.work / 'release.json'}",
              highlight=False)


@app.command("awq")
@friendly
def awq_cmd(
    model_dir: Path = typer.Argument(..., metavar="MODEL_DIR", help="Hugging Face model folder: Llama, Mistral, "
                                     "Qwen2, Qwen3, Qwen3-MoE, Gemma 2, Gemma 3 (text), Phi-3, OLMo 2 or SmolLM3."),
    out_dir: Path = typer.Option(..., "--output", "-o", help="Folder for the AWQ checkpoint (written atomically)."),
    bits: int = option(AWQOptions, "bits", "--bits"),
    group_size: int = option(AWQOptions, "group_size", "--group-size"),
    calib: str = option(AWQOptions, "calibration", "--calib"),
    samples: int = option(AWQOptions, "samples", "--samples"),
    seqlen: int = option(AWQOptions, "seqlen", "--seqlen"),
    device: str = option(AWQOptions, "device", "--device"),
    search_tokens: int | None = option(AWQOptions, "search_tokens", "--search-tokens"),
    overwrite: bool = flag("--overwrite", help="Replace OUT_DIR if it exists."),
    quiet: bool = flag("--quiet", "-q", help="No progress bars."),
) -> None:
    """Quantize to 4-bit AWQ in AutoAWQ's GEMM format (the layout vLLM and transformers+gptqmodel load), offline."""
    from ..awq.stage import run_awq

    options = AWQOptions.build(bits=bits, group_size=group_size, calibration=calib, samples=samples, seqlen=seqlen,
                               device=device, search_tokens=search_tokens)
    result = run_awq(options, model_dir, out_dir, _reporter(quiet), overwrite=overwrite)
    out.print(f"[green]awq[/] {result.summary} ({len(result.files)} files, {_human(result.bytes)})", highlight=False)


@app.command("w4a16")
@friendly
def w4a16_cmd(
    awq_dir: Path = typer.Argument(..., metavar="AWQ_DIR", help="An AWQ GEMM folder (releaser awq's)."),
    out_dir: Path = typer.Option(..., "--output", "-o", help="Folder for the W4A16 checkpoint (written atomically)."),
    overwrite: bool = flag("--overwrite", help="Replace OUT_DIR if it exists."),
    quiet: bool = flag("--quiet", "-q", help="No progress bar."),
) -> None:
    """Write an AWQ folder's codes, zero points and scales as compressed-tensors pack-quantized W4A16 (vLLM, SGLang,
    transformers + compressed-tensors): a repack, no rounding."""
    from ..formats.w4a16 import convert

    result = convert(awq_dir, out_dir, _reporter(quiet), overwrite=overwrite)
    out.print(f"[green]w4a16[/] {result.summary} ({len(result.files)} files, {_human(result.bytes)})", highlight=False)


@app.command("mlx")
@friendly
def mlx_cmd(
    model_dir: Path = typer.Argument(..., metavar="MODEL_DIR", help="An unquantized Hugging Face model folder "
                                     "(rounded as mlx_lm.convert -q rounds) or an AWQ GEMM folder (its 4-bit codes "
                                     "repacked, its group size kept)."),
    out_dir: Path = typer.Option(..., "--output", "-o", help="Folder for the MLX checkpoint (written atomically)."),
    bits: int = option(MLXOptions, "bits", "--bits"),
    group_size: int = option(MLXOptions, "group_size", "--group-size"),
    embedding_bits: int = option(MLXOptions, "embedding_bits", "--embedding-bits"),
    overwrite: bool = flag("--overwrite", help="Replace OUT_DIR if it exists."),
    quiet: bool = flag("--quiet", "-q", help="No progress bar."),
) -> None:
    """Write an MLX affine-quantized folder (mlx-lm's layout and config) of a model folder or of an AWQ folder."""
    from ..formats.mlx import quantize_folder

    options = MLXOptions.build(bits=bits, group_size=group_size, embedding_bits=embedding_bits)
    result = quantize_folder(options, model_dir, out_dir, _reporter(quiet), overwrite=overwrite)
    out.print(f"[green]mlx[/] {result.summary} ({len(result.files)} files, {_human(result.bytes)})", highlight=False)


@app.command("awq-eval")
@friendly
def awq_eval_cmd(
    model_dir: Path = typer.Argument(..., metavar="MODEL_DIR", help="The unquantized model folder."),
    awq_dir: Path = typer.Argument(..., metavar="AWQ_DIR", help="The AWQ folder made from it by releaser awq."),
    text: str = option(QualityOptions, "text", "--text"),
    ctx: int = option(QualityOptions, "ctx", "--ctx", "--seqlen"),
    chunks: int = option(QualityOptions, "chunks", "--chunks", "--rows"),
    quiet: bool = flag("--quiet", "-q", help="No progress bars."),
) -> None:
    """AWQ against plain round-to-nearest (same bits and group size): perplexity, mean KL divergence and same-top
    against the unquantized model, measured as releaser eval does; saved in the AWQ folder for the card."""
    from ..awq.evaluate import evaluate_awq

    options = QualityOptions.build(text=text, ctx=ctx, chunks=chunks)
    r = evaluate_awq(model_dir, awq_dir, _reporter(quiet), options=options)
    ppl, kld, top = r["perplexity"], r["kld_mean"], r["same_top"]
    out.print(f"[green]awq-eval[/] {r['tokens']} scored tokens of {r['text']}: perplexity unquantized "
              f"{ppl['unquantized']:.3f}, AWQ {ppl['awq']:.3f}, RTN {ppl['rtn']:.3f}; mean KLD AWQ {kld['awq']:.5f}, "
              f"RTN {kld['rtn']:.5f}; same top AWQ {top['awq']:.1%}, RTN {top['rtn']:.1%} -> "
              f"{awq_dir / 'awq_calibration.json'}", highlight=False)


@app.command("imatrix")
@friendly
def imatrix_cmd(
    model_dir: Path = typer.Argument(..., metavar="MODEL_DIR", help="The unquantized Hugging Face model folder."),
    output: Path = typer.Option(..., "--output", "-o", help="The imatrix file, NAME-imatrix.gguf (llama.cpp's GGUF "
                                "imatrix format; a name ending in .dat writes the legacy format)."),
    text: str = option(ImatrixOptions, "text", "--text"),
    ctx: int = option(ImatrixOptions, "ctx", "--ctx"),
    chunks: int | None = option(ImatrixOptions, "chunks", "--chunks"),
    process_output: bool = flag("--process-output", help=ImatrixOptions.help("process_output")),
    parse_special: bool = flag("--parse-special", help=ImatrixOptions.help("parse_special")),
    overwrite: bool = flag("--overwrite", help="Replace the output file if it exists."),
    quiet: bool = flag("--quiet", "-q", help="No progress bars."),
) -> None:
    """Compute the importance matrix (llama-imatrix's) of a model folder in torch, for imatrix-weighted quants."""
    from ..atomic import check_new
    from ..imatrix.compute import compute_imatrix
    from ..imatrix.file import write

    options = ImatrixOptions.build(text=text, ctx=ctx, chunks=chunks, process_output=process_output,
                                   parse_special=parse_special)
    check_new(output.absolute(), overwrite, kind="file")   # before the model runs
    result = compute_imatrix(options, model_dir, _reporter(quiet))
    write(result.imatrix, output, overwrite=overwrite)
    out.print(f"[green]imatrix[/] {len(result.imatrix.entries)} matrices, {result.chunks} chunks x {options.ctx} "
              f"tokens of {result.text.name} (sha256 {result.text.sha256}), {result.seconds:.0f} s -> {output}",
              highlight=False)


@app.command("imatrix-merge")
@friendly
def imatrix_merge_cmd(
    files: list[Path] = typer.Argument(..., metavar="FILE...", help="imatrix files (GGUF or legacy .dat) of one "
                                       "model."),
    output: Path = typer.Option(..., "--output", "-o", help="The merged file (.gguf; .dat: the legacy format)."),
    chunk_size: int | None = typer.Option(None, "--chunk-size", min=1, help="Tokens per chunk of legacy inputs and "
                                          "of the result (default: the first GGUF input's, else 512)."),
    overwrite: bool = flag("--overwrite", help="Replace the output file if it exists."),
) -> None:
    """Add imatrix files (sums and counts) as llama-imatrix --in-file a --in-file b does."""
    from ..imatrix.file import merge, read, write

    merged = merge([read(f) for f in files], chunk_size)
    write(merged, output, overwrite=overwrite)
    out.print(f"[green]imatrix-merge[/] {len(files)} file(s), {len(merged.entries)} matrices, {merged.chunk_count} "
              f"chunks -> {output}", highlight=False)


@app.command("eval")
@friendly
def eval_cmd(
    model_dir: Path = typer.Argument(..., metavar="MODEL_DIR", help="The unquantized Hugging Face model folder."),
    artefacts: list[Path] = typer.Argument(..., metavar="ARTEFACT...", help="GGUF files and/or AWQ, W4A16 or "
                                           "MLX folders made from MODEL_DIR."),
    text: str = option(QualityOptions, "text", "--text"),
    ctx: int = option(QualityOptions, "ctx", "--ctx"),
    chunks: int = option(QualityOptions, "chunks", "--chunks"),
    backend: str = option(QualityOptions, "backend", "--backend"),
    numerics: str = option(QualityOptions, "numerics", "--numerics"),
    no_gate: bool = flag("--no-gate", help="Report broken quants instead of failing."),
    output: Path = typer.Option(Path("quality.json"), "--output", "-o", help="The JSON report (for releaser card "
                                "--quality)."),
    quiet: bool = flag("--quiet", "-q", help="No progress bars."),
) -> None:
    """Measure perplexity and KL divergence of each GGUF/AWQ artefact against the unquantized model (llama.cpp's
    definitions), write a JSON report and fail on a broken quant."""
    from rich.table import Table

    from ..quality import run_quality

    options = QualityOptions.build(text=text, ctx=ctx, chunks=chunks, backend=backend, numerics=numerics,
                                   gate=not no_gate)
    result = run_quality(options, model_dir, artefacts, output, _reporter(quiet))
    report = result.facts
    table = Table(title=f"{report['text']['name']}: {report['chunks']} windows of {report['ctx']} tokens, "
                        f"{report['scored_tokens']} scored", title_justify="left")
    for col in ("File", "Type", "PPL", "PPL ratio", "Mean KLD", "99% KLD", "Same top"):
        table.add_column(col, justify="left" if col in ("File", "Type") else "right")
    table.add_row(model_dir.name, "unquantized", f"{report['model']['ppl']:.3f}", "1", "0", "0", "100.0%")
    for row in report["artefacts"]:
        table.add_row(row["file"], row["quant"], f"{row['ppl']:.3f}", f"{row['ppl_ratio']:.4f}",
                      f"{row['kld_mean']:.5f}", f"{row['kld_p99']:.5f}", f"{100 * row['same_top']:.1f}%")
    out.print(table)
    stop = report.get("stop_test")
    if stop:
        out.print(f"stop test ({stop['file']}): {'passed' if stop['passed'] else 'FAILED'}: {stop['text']!r}",
                  highlight=False)
    out.print(f"[green]quality[/] {result.summary}", highlight=False)


def run() -> None:
    """The ``releaser`` console script: the app, then a quick exit. Every command has finished its work (outputs
    committed, locks released, threads joined) when the app returns, so the interpreter's teardown (about half a
    second with torch loaded) is skipped: streams and log handlers are flushed and the process ends."""
    try:
        app()
        code = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # a closed pipe: nothing more can be said
            pass
    os._exit(code)

