"""The ``releaser`` command line: thin wrappers around the Python API; errors become one-line messages."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import typer
from rich.console import Console

from .errors import ReleaserError
from .quality.options import QualityOptions

app = typer.Typer(
    name="releaser",
    help="Turn one recipe into a finished model release: merge weights, fix tokenizers, export GGUF, render cards.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()


def friendly(fn):
    """Turn ReleaserError (and Ctrl-C) into a one-line message and a non-zero exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ReleaserError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            console.print("[bold red]interrupted[/]: nothing was written under the output name")
            raise typer.Exit(130) from None

    return wrapper


@app.callback()
def main() -> None:
    """releaser: merge, fix, quantize, document and publish model releases."""


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
    out_dir: Path = typer.Argument(..., metavar="OUT_DIR", help="Folder to write the merged model to (written atomically)."),
    device: str = typer.Option("cpu", help="Where the math runs: cpu, cuda or auto."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT_DIR if it exists."),
    shard_size: str = typer.Option("5G", help="Maximum bytes per output shard (K/M/G suffixes, powers of 1000)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Merge models with a mergekit YAML config; the output equals mergekit's."""
    from .checkpoint import parse_size
    from .merge import run_merge

    result = run_merge(config, out_dir, device=device, overwrite=overwrite, max_shard_bytes=parse_size(shard_size),
                       progress=not quiet)
    out.print(f"[green]merged[/] {result.tensors} tensors ({_human(result.bytes_written)}) with {result.method} "
              f"in {result.seconds:.1f} s -> {result.out_dir} ({', '.join(result.files)})", highlight=False)


@app.command()
@friendly
def card(
    model_dir: Path = typer.Argument(..., metavar="MODEL_DIR", help="Model folder: merged/HF, GGUF files or AWQ."),
    recipe: Path | None = typer.Option(None, "--recipe", "-r", help="Release recipe YAML (name, license, ...)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write the card here (default: stdout)."),
    template: Path | None = typer.Option(None, "--template", "-t", help="Your own Jinja2 card template."),
    quality: Path | None = typer.Option(None, "--quality", help="Quality report from releaser eval: adds PPL, KLD "
                                        "and same-top figures to GGUF and AWQ cards."),
) -> None:
    """Render a model card (README.md) from what MODEL_DIR contains and the recipe."""
    from .card import render_card, write_card
    from .recipe import load_recipe

    spec = load_recipe(recipe) if recipe else None
    if output is None:
        sys.stdout.write(render_card(model_dir, spec, template, quality))
        return
    result = write_card(model_dir, output, spec, template, quality)
    console.print(f"[green]card[/] ({result.kind}, {result.bytes} bytes, template {result.template.name}) "
                  f"-> {result.path}", highlight=False)


@app.command()
@friendly
def doctor(
    model_dir: Path = typer.Argument(..., metavar="MODEL_DIR", help="Hugging Face model folder to check."),
    template: str | None = typer.Option(None, "--template", "-t", help="Chat format it should have: a built-in "
                                        "name (chatml, llama2, llama3, mistral, alpaca, vicuna, zephyr, gemma, phi3) "
                                        "or a .jinja file."),
    as_json: bool = typer.Option(False, "--json", help="Print the findings as JSON."),
) -> None:
    """Find why a model would not stop generating: eos, generation_config, pad, template, special tokens, rows."""
    from .tokenizer.console import run_doctor

    raise typer.Exit(run_doctor(model_dir, template, as_json, Console(soft_wrap=as_json)))


@app.command("fix-tokenizer")
@friendly
def fix_tokenizer_cmd(
    model_dir: Path = typer.Argument(..., metavar="MODEL_DIR", help="Hugging Face model folder to fix."),
    template: str = typer.Option(..., "--template", "-t", help="Built-in chat template name or a .jinja file."),
    out_dir: Path | None = typer.Option(None, "--output", "-o", help="Write a fixed copy to this folder."),
    in_place: bool = typer.Option(False, "--in-place", help="Change MODEL_DIR itself (only the changed files)."),
    eos: str | None = typer.Option(None, "--eos", help="End-of-turn token (default: the template's, else the eos)."),
    system_prompt: str | None = typer.Option(None, "--system-prompt", help="Default system message."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT_DIR if it exists."),
) -> None:
    """Set the chat template and fix eos, generation_config, pad, special tokens, BOS and untrained rows."""
    from .tokenizer.console import run_fix
    from .tokenizer.fix import FixSpec

    run_fix(model_dir, FixSpec(template, out_dir, in_place, eos, system_prompt, overwrite), Console())


@app.command("gguf")
@friendly
def gguf_cmd(
    model_dir: Path = typer.Argument(..., metavar="MODEL_DIR", help="Hugging Face Llama/Mistral/Qwen2 model folder."),
    out_dir: Path = typer.Option(..., "--output", "-o", help="Folder for the .gguf files (created if missing)."),
    quant: str = typer.Option("Q4_K_M", "--quant", "-q", help="Comma-separated types: F32, F16, BF16, Q8_0, Q4_0, "
                              "Q4_1, Q5_0, Q5_1, Q2_K, Q3_K_S, Q3_K_M, Q3_K_L, Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M, Q6_K."),
    name: str | None = typer.Option(None, "--name", help="Model name: general.name and the file names {Name}-{TYPE}."),
    split_max_size: str | None = typer.Option(None, "--split-max-size", help="Split files above this size, e.g. 48G."),
    license: str | None = typer.Option(None, "--license", help="general.license (default: from the model card)."),
    base_model: list[str] | None = typer.Option(None, "--base-model", help="Base model repo id (repeatable)."),
    tag: list[str] | None = typer.Option(None, "--tag", help="general.tags entry (repeatable)."),
    quantized_by: str | None = typer.Option(None, "--quantized-by", help="general.quantized_by."),
    pre_tokenizer: str | None = typer.Option(None, "--pre-tokenizer", help="llama.cpp BPE pre-tokenizer name "
                                             "(default: detected by llama.cpp's hash check)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing files of the same names."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Export GGUF files (one pass over the checkpoint; llama-quantize's mixes, same bytes as llama.cpp)."""
    from .gguf import export_gguf

    result = export_gguf(model_dir, out_dir, quant, name, split_max_size, overwrite=overwrite, license=license,
                         tags=tag, base_models=base_model, quantized_by=quantized_by, pre_tokenizer=pre_tokenizer,
                         progress=not quiet)
    out.print(result.summary(), highlight=False)


@app.command("gguf-fix")
@friendly
def gguf_fix_cmd(
    file: Path = typer.Argument(..., metavar="FILE.gguf", help="GGUF file to fix (in place unless --output)."),
    chat_template: Path | None = typer.Option(None, "--chat-template", help="File with the new Jinja chat template."),
    eos: str | None = typer.Option(None, "--eos", help="Text of the new eos token, e.g. <|im_end|>."),
    name: str | None = typer.Option(None, "--name", help="New general.name."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write the fixed file here instead."),
) -> None:
    """Rewrite a GGUF's chat template, eos or name without requantizing (tensor bytes are copied unchanged)."""
    from .errors import ConfigError
    from .gguf.fix import fix_gguf

    template = None
    if chat_template is not None:
        try:
            template = chat_template.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read the chat template {chat_template} ({exc.strerror or exc})") from exc
    result = fix_gguf(file, chat_template=template, eos=eos, name=name, out=output)
    out.print(result.summary(), highlight=False)


@app.command("eval")
@friendly
def eval_cmd(
    model_dir: Path = typer.Argument(..., metavar="MODEL_DIR", help="The unquantized Hugging Face model folder."),
    artefacts: list[Path] = typer.Argument(..., metavar="ARTEFACT...", help="GGUF files and/or AWQ folders made "
                                           "from MODEL_DIR."),
    text: str = typer.Option("builtin", "--text", help=QualityOptions.help("text")),
    ctx: int = typer.Option(512, "--ctx", help=QualityOptions.help("ctx")),
    chunks: int = typer.Option(8, "--chunks", help=QualityOptions.help("chunks")),
    backend: str = typer.Option("torch", "--backend", help=QualityOptions.help("backend")),
    no_gate: bool = typer.Option(False, "--no-gate", help="Report broken quants instead of failing."),
    output: Path = typer.Option(Path("quality.json"), "--output", "-o", help="The JSON report (for releaser card "
                                "--quality)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Measure perplexity and KL divergence of each GGUF/AWQ artefact against the unquantized model (llama.cpp's
    definitions), write a JSON report and fail on a broken quant."""
    from contextlib import contextmanager

    from rich.progress import Progress
    from rich.table import Table

    from .quality import run_quality
    from .stage import Reporter

    class RichReporter(Reporter):
        def message(self, text: str) -> None:
            console.print(text, highlight=False)

        def warning(self, text: str) -> None:
            console.print(f"[yellow]warning:[/] {text}", highlight=False)

        @contextmanager
        def progress(self, description: str, total: float | None = None):
            with Progress(console=console, transient=True, disable=quiet) as bar:
                task = bar.add_task(description, total=total)
                yield lambda n=1: bar.update(task, advance=n)

    from pydantic import ValidationError

    from .errors import ConfigError

    try:
        options = QualityOptions(text=text, ctx=ctx, chunks=chunks, backend=backend, gate=not no_gate)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(f"--{err['loc'][0]}: {err['msg']}") from None
    result = run_quality(options, model_dir, artefacts, output, RichReporter())
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
