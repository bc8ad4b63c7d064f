"""The quality stage (``run(options, inputs, out, reporter) -> StageResult`` around :func:`run_quality`): perplexity
and KL divergence of every GGUF file and AWQ folder against the unquantized model, a JSON report, and the gate (see
gate.py). Models run streamed (embeddings resident, one decoder layer at a time, see load.py): the unquantized model
runs first and keeps its log-probabilities in a temporary file beside the report. Only the stop tests (generation)
hold a whole model, one at a time, before anything else runs."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from ..atomic import TMP_TAG, hidden, os_error, write_file
from ..errors import ConfigError, ModelError
from ..stage import Reporter, StageResult, describe_files
from ..tasks import PROCESS_BYTES, Resources, Task, float_bytes, run_local
from . import load as ld
from .gate import STOP_TEST_TYPES, QualityGateError, StopResult, max_kld, stop_test, stop_verdict
from ..gguf.reader import GGUFFile
from .metrics import BaseLogProbs, Figures, NonFiniteLogits, score_against, score_base
from .options import QualityOptions
from .text import Windows, load_text, make_windows, tokenize

REPORT_VERSION = 1


def _vocab_mismatch(gfile: GGUFFile, tokenizer, ids) -> str | None:
    """Where the GGUF's vocabulary gives one of ``ids`` another token than the model's tokenizer (None: same)."""
    tokens = gfile.values.get("tokenizer.ggml.tokens") or []
    for i in sorted(set(int(x) for x in ids)):
        ours = tokens[i] if i < len(tokens) else None
        theirs = tokenizer.convert_ids_to_tokens(i)
        if ours != theirs:
            return f"token id {i} is {ours!r} in the file but {theirs!r} in the model's tokenizer"
    return None


def _tokenizer_mismatch(art: ld.Artefact, tokenizer, text: str, windows: Windows) -> str | None:
    """Does the artefact read the evaluation text as the same token ids as the unquantized model?"""
    if art.kind == "gguf":
        return _vocab_mismatch(GGUFFile(art.parts[0]), tokenizer, windows.tokens.unique().tolist())
    from ..tokenizer.model import load_tokenizer

    try:
        own = load_tokenizer(art.path)
    except ModelError as exc:
        return f"its tokenizer does not load ({str(exc)[:160]})"
    n = windows.count * windows.ctx
    ours, ref = tokenize(own, text)[:n], tokenize(tokenizer, text)[:n]
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            return f"it tokenizes the text differently from the model (token {i}: {a} instead of {b})"
    if len(ours) < len(ref):
        return "it tokenizes the text into fewer tokens than the model"
    return None


def _stop_test_target(arts: list[ld.Artefact]) -> ld.Artefact | None:
    by_type = {a.quant: a for a in arts if a.kind == "gguf"}
    for q in STOP_TEST_TYPES:
        if q in by_type:
            return by_type[q]
    awq = [a for a in arts if a.kind == "awq"]
    return awq[0] if awq else (arts[0] if arts else None)


def _chat_setup(art: ld.Artefact, tokenizer) -> tuple[str | None, list[int], object]:
    """The artefact's own chat template, end-of-turn ids and the tokenizer to render with."""
    if art.kind == "gguf":
        values = GGUFFile(art.parts[0]).values
        ends = [values.get(k) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eos_token_id")]
        return values.get("tokenizer.chat_template"), [int(e) for e in ends if e is not None], tokenizer
    return _folder_chat(art.path)


def _folder_chat(path: Path, own=None) -> tuple[str | None, list[int], object]:
    """A Hugging Face folder's chat template, end-of-turn ids (eos and generation_config's) and tokenizer (``own``
    when loaded already)."""
    from transformers import GenerationConfig

    from ..tokenizer.model import load_tokenizer

    own = own or load_tokenizer(path)
    ends = {own.eos_token_id}
    try:
        eos = GenerationConfig.from_pretrained(path).eos_token_id
        ends.update(eos if isinstance(eos, list) else [eos])
    except OSError:
        pass
    return own.chat_template, [e for e in ends if e is not None], own


def _libc():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:   # not glibc
        return None


def _collect_garbage() -> None:
    gc.collect()
    libc = _libc()
    if libc is not None:  # return freed model memory to the OS between models (peak RSS stays one model)
        libc.malloc_trim(0)


def _heap_for_big_temporaries() -> None:
    """glibc serves a freed large block's size from the heap from then on (its mmap threshold follows the largest
    block freed), where logits blocks and layer weights of each pass fragment it and RSS creeps up; a fixed threshold
    keeps every block over 4 MiB in its own mapping, returned when freed."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, 4 << 20)   # M_MMAP_THRESHOLD


def run(options: QualityOptions, inputs: list, out: str | os.PathLike, reporter: Reporter | None = None, *,
        describe=describe_files, run_tasks=None, units: str | os.PathLike | None = None) -> StageResult:
    """:func:`run_quality` of ``inputs`` (the unquantized model folder, then the GGUF files and AWQ folders made from
    it) with the report ``out``; the result stands for the report's folder. A failed gate is a GateError (nothing of
    the release is published)."""
    from ..errors import GateError

    out = Path(out)
    try:
        result = run_quality(options, inputs[0], inputs[1:], out, reporter, run_tasks=run_tasks, units=units)
    except QualityGateError as exc:
        raise GateError(f"quality gate: {exc}") from None
    return StageResult("quality", out.parent, describe(out.parent, [out]), result.summary, result.facts)


def run_quality(options: QualityOptions, model_dir: str | os.PathLike, artefacts: list, out_path: str | os.PathLike,
                reporter: Reporter | None = None, *, run_tasks=None, units: str | os.PathLike | None = None) -> StageResult:
    """Measure every artefact against ``model_dir``; write the JSON report to ``out_path``; raise QualityGateError
    (after writing the report) when the gate is on and an artefact fails it. The stop test, the unquantized model's
    pass and each artefact's are units (:mod:`releaser.tasks`): run here in order, or through ``run_tasks`` (an
    executor: the artefacts side by side, on any node; the figures are the same). ``units``: a folder where the stop
    test's and each artefact's figures are kept as they are made (a release's, keyed by the stage's fingerprint): a
    killed run's finished units are taken, not measured again (the unquantized pass runs again when an artefact is
    left to measure)."""
    from ..tokenizer.model import load_tokenizer

    start = time.perf_counter()
    _heap_for_big_temporaries()
    reporter = reporter or Reporter()
    model_dir, out_path = Path(model_dir), Path(out_path).absolute()
    if not model_dir.is_dir():
        raise ModelError(f"model folder {model_dir} does not exist")
    if not artefacts:
        raise ConfigError("no artefacts to evaluate; give GGUF files or AWQ, W4A16 or MLX folders")
    if options.backend == "llama.cpp":
        from . import llamacpp
        llamacpp._llama()  # a clear error now rather than after the unquantized pass
    arts = [ld.identify(a) for a in artefacts]
    labels = [a.label for a in arts]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"two artefacts have the same name ({labels}); evaluate them separately")
    base_config = ld.read_config(model_dir)
    text = load_text(options.text)
    tokenizer = load_tokenizer(model_dir, "the quality stage")
    windows = make_windows(tokenizer, text, options.ctx, options.chunks)

    failures: list[str] = []
    mismatch = {a.label: _tokenizer_mismatch(a, tokenizer, text.text, windows) for a in arts}
    for label, why in mismatch.items():
        if why:
            failures.append(f"{label}: {why}; its figures compare different tokens (a wrong tokenizer?)")
    if failures and options.gate:
        raise QualityGateError(failures[0])
    for f in failures:
        reporter.warning(f)

    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(exc, out_path) from exc
    target = _stop_test_target(arts) if options.stop_test else None
    chat = _chat_setup(target, tokenizer) if target else None
    if chat and (not chat[0] or not chat[1]):
        reporter.message(f"stop test skipped: {target.label} has no chat template or end-of-turn token")
        target = chat = None
    base_chat = _folder_chat(model_dir, tokenizer) if target else None
    if base_chat and (not base_chat[0] or not base_chat[1]):
        base_chat = None   # the unquantized folder has no chat setup of its own: the quant's verdict stands alone
    # the stop tests first: they hold whole models, best before the streamed passes leave anything behind; then the
    # unquantized model, then each artefact against it: units an executor may run on other nodes, side by side
    if run_tasks is None:
        run_tasks, size = (lambda tasks: run_local(tasks, reporter)), Resources()
    else:
        size = Resources(cpus=1, memory=PROCESS_BYTES + float_bytes(model_dir)[0])   # an upper bound: they stream
    stop = None
    rows: list[dict] = []
    seconds: dict[str, float] = {}   # run times go to the manifest, not into the report: its bytes depend on the inputs
    # beside the report, named as the atomic writer's temporaries: what a killed run leaves is swept when the next
    # run writes the report
    with tempfile.TemporaryDirectory(prefix=hidden(out_path, TMP_TAG) + "base-", dir=out_path.parent) as tmp:
        def keep(name: str) -> str | None:
            return str(Path(units) / name) if units is not None else None

        first = [Task("unquantized model", "releaser.quality.stage:base_unit",
                      (options, str(model_dir), windows, len(arts), tmp), {}, size)]
        if target:
            first.insert(0, Task(f"stop test {target.label}", "releaser.quality.stage:stop_unit",
                                 (str(model_dir), target, base_config, chat, base_chat), {}, size, keep("stop test")))
        done = run_tasks(first)
        if target:
            stop = done[0].value
        base, windows = done[-1].value
        # an artefact with the float weights of one measured before it (W4A16 made from the AWQ codes) takes its figures
        digests = [_float_digest(a, base_config) if a.kind in SAME_WEIGHTS_KINDS else None for a in arts]
        first_of = {d: arts[i] for i, d in reversed(list(enumerate(digests))) if d}
        measured = [a for a, d in zip(arts, digests) if d is None or first_of[d] is a]
        done = dict(zip((a.label for a in measured), run_tasks([
            Task(art.label, "releaser.quality.stage:measure_unit",
                 (options, art, base_config, windows, base.store, base.figures.ppl), {}, size, keep(art.label))
            for art in measured])))
        for art, digest in zip(arts, digests):
            same_as = first_of[digest].label if digest and first_of[digest] is not art else None
            d = done[same_as or art.label]
            figures = d.value
            limit = max_kld(art.quant, options.max_kld)
            row = {"file": art.label, "path": _shown(art.path, out_path.parent), "kind": art.kind, "quant": art.quant,
                   "size": _size(art), **figures.to_dict(), "max_kld": limit,
                   "backend": options.backend if art.kind == "gguf" else "torch"}
            if same_as:
                row["same_weights_as"] = same_as
            seconds[art.label] = 0.0 if same_as else round(d.seconds, 2)
            if mismatch[art.label]:
                row["tokenizer_mismatch"] = mismatch[art.label]
            rows.append(row)
            reporter.message(f"{art.label}: PPL {figures.ppl:.3f}, mean KLD {figures.kld_mean:.5f}, "
                             f"same top {100 * figures.same_top:.1f}%"
                             + (f" (the same dequantized weights as {same_as})" if same_as else ""))
            if figures.kld_mean > limit:
                failures.append(f"{art.label}: mean KLD {figures.kld_mean:.4f} against the unquantized model is far "
                                f"above what {art.quant} gives (limit {limit}); the file is broken (a bad conversion "
                                "or a zeroed tensor?)")
    if stop is not None and not stop["passed"]:
        failures.append(f"{stop['file']}: greedy generation did not end with the end-of-turn token within "
                        f"{stop['tokens']} tokens while the unquantized model ends its turn after "
                        f"{stop['unquantized']['tokens']} (stop test on the quantized weights); output "
                        f"{stop['text'][:80]!r}")
    elif stop is not None and not stop["conclusive"]:
        reporter.warning(f"stop test inconclusive: neither the unquantized model nor {stop['file']} ends the test "
                         f"chat within {stop['tokens']} tokens")

    report = {
        "version": REPORT_VERSION,
        "text": {"name": text.name, "sha256": text.sha256, "tokens": windows.text_tokens},
        "ctx": windows.ctx, "chunks": windows.count, "scored_tokens": base.figures.tokens,
        "numerics": options.numerics,
        "model": {"path": _shown(model_dir, out_path.parent), **base.figures.to_dict()},
        "artefacts": rows,
        "stop_test": stop,
        "gate": {"enabled": options.gate, "passed": not failures, "failures": failures},
    }
    seconds["total"] = round(time.perf_counter() - start, 1)
    write_file(out_path, json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n")   # JSON has no NaN
    if failures and options.gate:
        raise QualityGateError(failures[0] + (f" (and {len(failures) - 1} more; see {out_path})"
                                              if len(failures) > 1 else f"; figures in {out_path}"))
    for f in failures:
        reporter.warning(f)
    summary = (f"measured {len(rows)} artefact(s) on {windows.count} windows of {windows.ctx} tokens of "
               f"{text.name!r} in {seconds['total']} s -> {out_path}")
    return StageResult("quality", out_path.parent, describe_files(out_path.parent, [out_path]), summary,
                       facts={**report, "seconds": seconds})


def stop_unit(model_dir: str, target: ld.Artefact, base_config: dict, chat: tuple, base_chat: tuple | None, *,
              reporter: Reporter | None = None) -> dict:
    """A unit of the stage: the stop test of the artefact ``target`` (and of the unquantized model, the reference)."""
    unquantized = _stop_test(Path(model_dir), None, base_chat) if base_chat else None
    return {"file": target.label, **stop_verdict(_stop_test(target, base_config, chat), unquantized)}


def base_unit(options: QualityOptions, model_dir: str, windows: Windows, n_artefacts: int, tmp: str, *,
              reporter: Reporter | None = None) -> tuple[_Base, Windows]:
    """A unit of the stage: the unquantized model's pass, its log-probabilities in ``tmp`` (a folder every unit
    sees)."""
    _heap_for_big_temporaries()
    try:
        return _base_pass(Path(model_dir), windows, n_artefacts, options, Path(tmp), reporter or Reporter())
    except NonFiniteLogits as exc:
        raise ModelError(f"the unquantized model {model_dir} gives {exc}, so nothing can be measured against it; "
                         "its weights are broken (look for NaN or infinite values)") from None


def measure_unit(options: QualityOptions, artefact: ld.Artefact | str, base_config: dict, windows: Windows,
                 store: BaseLogProbs, base_ppl: float, *, reporter: Reporter | None = None) -> Figures:
    """A unit of the stage: one artefact's figures (an Artefact, or the path of one) against the unquantized model's
    log-probabilities ``store``."""
    _heap_for_big_temporaries()
    reporter = reporter or Reporter()
    art = ld.identify(artefact)
    with ExitStack() as stack:
        if art.kind == "gguf" and options.backend == "llama.cpp":
            from . import llamacpp
            advance = stack.enter_context(reporter.progress(f"quality: {art.label}", total=windows.count))
            run = stack.enter_context(llamacpp.scored_logits(art.parts[0], windows.ctx, windows.first))
        else:
            weights = stack.enter_context(ld.open_weights(art, base_config))
            run = _streamed(weights, windows, reporter, f"quality: {art.label}", stack, numerics=options.numerics)[1]
            advance = _no_advance
        try:
            figures = score_against(run, windows, store, base_ppl, advance)
        except NonFiniteLogits as exc:
            raise QualityGateError(f"{art.label} gives {exc}; the file is broken (a bad conversion or a "
                                   "corrupted tensor): rebuild it") from None
        del run
    _collect_garbage()
    return figures


def _shown(path: Path, root: Path) -> str:
    """``path`` relative to the report's folder when inside it: a report's bytes do not depend on where it lies."""
    path, root = Path(path).absolute(), Path(root).absolute()
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


class _Base:
    def __init__(self, store: BaseLogProbs, figures: Figures):
        self.store, self.figures = store, figures


def _base_pass(model_dir: Path, windows: Windows, n_artefacts: int, options: QualityOptions, tmp: Path,
               reporter: Reporter) -> tuple[_Base, Windows]:
    """Run the unquantized model (windows cut to the time budget), keeping its log-probabilities in ``tmp``."""
    with ExitStack() as stack:
        weights = stack.enter_context(ld.open_weights(model_dir))
        budget = options.time_budget
        passes = 1 + ld.forward_passes(windows.count - 1, windows.ctx) if budget else None   # window 0 alone first
        model, run = _streamed(weights, windows, reporter, "quality: unquantized model", stack, passes,
                               options.numerics)
        if budget:
            t0 = time.perf_counter()
            first = list(next(iter(run(windows.tokens[:1]))))
            per_window = time.perf_counter() - t0
            load_overhead = 5.0 * n_artefacts   # loading/dequantizing one artefact (measured on 135M-1B models)
            fit = int((budget - load_overhead) // (per_window * (1 + n_artefacts)))
            if fit < windows.count:
                n = max(1, fit)
                reporter.warning(f"time budget {budget:g} s: measuring {n} window(s) instead of {windows.count} "
                                 f"({per_window:.1f} s per window and model)")
                windows = windows.head(n)
            run = _after_first(first, run)
        store = BaseLogProbs(tmp / "base-logprobs.npy", windows.count, windows.scored_per_window,
                             model.lm_head.out_features)
        figures = score_base(run, windows, store)
    reporter.message(f"unquantized model: PPL {figures.ppl:.3f} over {figures.tokens} tokens")
    del model, run
    _collect_garbage()
    return _Base(store, figures), windows


def _no_advance(n=1, description=None) -> None:
    pass


def _streamed(weights: ld.Weights, windows: Windows, reporter: Reporter, label: str, stack: ExitStack,
              passes: int | None = None, numerics: str = "float32"):
    """The streamed model of ``weights`` and its scored logits, with a progress bar (in ``stack``) counting the
    decoder layers run: ``passes`` forward passes (by default those that ``windows`` take) over every layer. With
    ``numerics="llama.cpp"`` the model computes as llama.cpp's CPU backend does (see numerics.py)."""
    passes = ld.forward_passes(windows.count, windows.ctx) if passes is None else passes
    layers = int(weights.config.get("num_hidden_layers") or 0)
    advance = stack.enter_context(reporter.progress(label, total=passes * layers or None))
    model = ld.streamed(weights, advance)
    if numerics == "llama.cpp":
        from .numerics import emulate

        emulate(model, ld.weight_types(model, weights))
    return model, ld.scored_logits(model, windows.first)


def _after_first(first: list[torch.Tensor], run):
    """``run`` for windows whose first one ran already (its blocks ``first``)."""

    def rest(tokens: torch.Tensor):
        yield iter(first)
        if tokens.shape[0] > 1:
            yield from run(tokens[1:])

    return rest


def _stop_test(source: ld.Artefact | Path, base_config: dict | None, chat: tuple) -> StopResult:
    """The stop test (greedy generation of a chat answer) on the whole model of ``source``: generation needs every
    layer at each step, so this is the one place a whole model is in memory; it is freed after."""
    template, ends, tok = chat
    model = ld.load(source, base_config)
    try:
        return stop_test(model, tok, template, ends)
    finally:
        del model
        _collect_garbage()


SAME_WEIGHTS_KINDS = ("awq", "w4a16")   # formats of the same AWQ pass: their float weights may be identical


def _float_digest(art: ld.Artefact, base_config: dict) -> str:
    """sha256 of an artefact's weights as the quality pass reads them (names, shapes, float32 bytes)."""
    h = hashlib.sha256()
    with ld.open_weights(art, base_config) as weights:
        for name, tensor in weights.load(sorted(weights.names)):
            h.update(f"{name}{tuple(tensor.shape)}".encode())
            h.update(tensor.contiguous().numpy().tobytes())
    return h.hexdigest()


def _size(art: ld.Artefact) -> int:
    if art.kind == "gguf":
        return sum(p.stat().st_size for p in art.parts)
    return sum(p.stat().st_size for p in art.path.glob("*.safetensors"))
