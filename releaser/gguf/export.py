"""``export_gguf``: HF model folder -> one GGUF file (or split set) per requested type, in one streaming pass."""

from __future__ import annotations

import math
import os
import queue
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.gguf_writer import WriterState

from ..atomic import check_new, output_files
from ..errors import ConfigError
from ..checkpoint import CheckpointReader, parse_size
from ..stage import Reporter
from . import kernels
from .convert import Converter
from .imatrix_weights import Imatrix, ImatrixError, load_imatrix
from .mixes import DEFAULT_TYPE, NEEDS_IMATRIX, UNQUANTIZED, QuantSpec, allows_quantization, file_type, quant_specs, \
    requires_imatrix, tensor_types
from .quants import WEIGHTED_TYPES, WEIGHTS_REQUIRED
from .stops import SAMPLING, SAMPLING_PREFIX, sampling_values
from .vocab import TokenizerInfo, add_tokenizer


@dataclass
class GGUFResult:
    out_dir: Path
    name: str
    files: dict[str, list[Path]]                  # quant -> file(s) (several when split)
    tensor_types: dict[str, dict[str, str]]       # quant -> tensor name -> ggml type name
    tokenizer: TokenizerInfo
    seconds: float
    sizes: dict[str, int] = field(default_factory=dict)   # quant -> bytes over all its files
    imatrix: dict | None = None     # the quantize.imatrix.* keys of the quantized files (made with an imatrix)

    def summary(self) -> str:
        lines = [f"wrote {sum(len(f) for f in self.files.values())} GGUF file(s) to {self.out_dir} "
                 f"in {self.seconds:.1f} s (tokenizer {self.tokenizer.model}/{self.tokenizer.pre}, "
                 f"eos {self.tokenizer.eos})"]
        for quant, paths in self.files.items():
            lines.append(f"  {quant:7s} {self.sizes[quant] / 1e6:9.1f} MB  " + ", ".join(p.name for p in paths))
        if self.imatrix:
            lines.append(f"  importance matrix {self.imatrix['quantize.imatrix.file']} "
                         f"({self.imatrix['quantize.imatrix.entries_count']} entries)")
        return "\n".join(lines)


class _Writer(gguf.GGUFWriter):
    """GGUFWriter that packs each metadata value once for all output files (the vocabulary arrays are large)."""

    def __init__(self, path: Path, arch: str, split_max_size: int, packed: dict):
        super().__init__(path, arch, split_max_size=split_max_size)
        self.packed = packed  # key -> (value object, packed key+value bytes), shared by the writers of one export

    def write_kv_data_to_file(self) -> None:
        if self.state is not WriterState.HEADER:
            raise ValueError(f"Expected output file to contain the header, got {self.state}")
        assert self.fout is not None
        for fout, kv_data in zip(self.fout, self.kv_data):
            kv_bytes = bytearray()
            for key, val in kv_data.items():
                cached = self.packed.get(key)
                if cached is None or cached[0] is not val.value:
                    packed = (self._pack_val(key, gguf.GGUFValueType.STRING, add_vtype=False)
                              + self._pack_val(val.value, val.type, add_vtype=True, sub_type=val.sub_type))
                    cached = self.packed[key] = (val.value, packed)
                kv_bytes += cached[1]
            fout.write(kv_bytes)
        self.flush()
        self.state = WriterState.KV_DATA


def _nbytes(shape: tuple[int, ...], qtype: T) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape))
    return n // block * size


def _file_stem(name: str) -> str:
    return re.sub(r"[^\w.+-]+", "-", name.strip()).strip("-") or "model"


def _default_name(conv: Converter) -> str:
    source = conv.config.get("_name_or_path") or conv.config.get("name_or_path") or ""
    if source and "/" in source:
        return source.rstrip("/").split("/")[-1]
    return conv.reader.folder.resolve().name


@contextmanager
def _without_model_card() -> Iterator[None]:
    """gguf-py's Metadata.load reads README.md's front matter and has no switch for it: leave it out meanwhile."""
    original = gguf.Metadata.__dict__["load_model_card"]
    gguf.Metadata.load_model_card = staticmethod(lambda model_path=None: {})
    try:
        yield
    finally:
        gguf.Metadata.load_model_card = original


def _metadata(conv: Converter, name: str, *, license: str | None, tags, base_models, quantized_by, pre,
              model_card: bool, languages=None) -> tuple[gguf.GGUFWriter, TokenizerInfo]:
    """A writer-less template holding every key the output files share (general.*, hyper-parameters, tokenizer)."""
    w = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[conv.gguf_arch])
    with nullcontext() if model_card else _without_model_card():
        meta = gguf.Metadata.load(None, conv.reader.folder, name, conv.total_params)
    meta.name = name
    if meta.size_label is None:
        meta.size_label = gguf.size_label(conv.total_params, conv.total_params, 0, 0)
    if license:
        meta.license = license
    if tags:
        meta.tags = list(dict.fromkeys([*(meta.tags or []), *tags]))
    if languages:
        meta.languages = list(dict.fromkeys([*(meta.languages or []), *languages]))
    if base_models:
        meta.base_models = [{"name": b.split("/")[-1], "organization": b.split("/")[0] if "/" in b else None,
                             "repo_url": f"https://huggingface.co/{b}"} for b in base_models]
    if quantized_by:
        meta.quantized_by = quantized_by
    sampling = sampling_values(conv.reader.folder)   # as the vendored gguf-py reads generation_config.json
    for _, key, _ in SAMPLING:
        setattr(meta, "sampling_" + key.removeprefix(SAMPLING_PREFIX), sampling.get(key, (None,))[0])
    w.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(w)
    conv.add_hparams(w)
    info = add_tokenizer(w, conv.reader.folder, conv.config, pre)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return w, info


def export_gguf(model_dir, out_dir, quants=("Q4_K_M",), name: str | None = None, split_max_size=None, *,
                overwrite: bool = False, license: str | None = None, tags=None, languages=None, base_models=None,
                quantized_by: str | None = None, pre_tokenizer: str | None = None, workers: int | None = None,
                model_card: bool = True, imatrix: str | os.PathLike | Imatrix | None = None,
                reporter: Reporter | None = None) -> GGUFResult:
    """Convert ``model_dir`` (an HF folder of a family in ``releaser.arch``) to GGUF files ``{Name}-{TYPE}.gguf`` in
    ``out_dir``.

    The checkpoint is read once, one tensor at a time; every requested type is written from that tensor before the
    next is read. Quantization runs on ``workers`` threads (default: all cores). Files appear under their final names
    only when all of them are complete. ``pre_tokenizer`` overrides llama.cpp's hash-based BPE pre-tokenizer choice.
    ``model_card``: take license, tags and base models from README.md's front matter too, as llama.cpp's converter
    does (a release passes False: the README.md in its main folder is the card it writes after this stage).
    ``imatrix``: an importance matrix file (llama-imatrix's GGUF or legacy .dat, or ``releaser imatrix``'s): the
    quantized types are made as ``llama-quantize --imatrix FILE`` makes them (weighted search, its mix rules, its
    ``quantize.imatrix.*`` keys with the path as given here); F32/F16/BF16 files do not use it.
    """
    start = time.perf_counter()
    specs = {s.name: s for s in quant_specs(quants)}
    if searched := [q for q, s in specs.items() if s.searched]:
        raise ConfigError(f"GGUF quant {searched[0]} has a target: search its recipe first "
                          "(releaser.gguf.search.search_recipe; the gguf stage does)")
    base = {q: s.base for q, s in specs.items()}
    reporter = reporter or Reporter()
    if imatrix is None and (need := [q for q in specs if base[q] in NEEDS_IMATRIX]):
        instead = " or ".join(dict.fromkeys(NEEDS_IMATRIX[base[q]] for q in need))
        raise ConfigError(f"{', '.join(need)} needs an importance matrix (llama-quantize refuses it without one): "
                          f"pass --imatrix FILE (gguf.imatrix in a recipe) or choose {instead}")
    im = load_imatrix(imatrix) if imatrix is not None and not isinstance(imatrix, Imatrix) else imatrix
    split_bytes = parse_size(split_max_size) if split_max_size else 0
    out_dir = Path(out_dir).absolute()
    with CheckpointReader(model_dir) as reader:
        conv = Converter(reader)
        descs = [p.desc for p in conv.plan]
        _check_patterns(specs.values(), descs)
        types = {q: tensor_types(descs, spec, conv.shape, has_imatrix=im is not None and _quantized(spec.base))
                 for q, spec in specs.items()}
        if im is None and (need := [(q, d.name, t) for q, ts in types.items() for d, t in zip(descs, ts)
                                    if requires_imatrix(base[q], d.name, t)]):
            q, tensor, t = need[0]
            raise ConfigError(f"{q} stores {tensor} as {t.name}, which needs an importance matrix (llama-quantize "
                              "refuses it without one): pass --imatrix FILE (gguf.imatrix in a recipe) or choose "
                              "another type for it")
        weights = _imatrix_weights(im, conv, types, base, reporter) if im is not None else {}
        if need := [(q, d.name, t) for q, ts in types.items() for d, t in zip(descs, ts)
                    if t in WEIGHTS_REQUIRED and d.name not in weights]:
            q, tensor, t = need[0]
            why = f"imatrix {im.name} has no entry for it" if im is not None else "pass --imatrix FILE"
            raise ConfigError(f"{q} stores {tensor} as {t.name}, which llama.cpp cannot make without importance "
                              f"weights (llama-quantize aborts; {why}): choose another type for it")
        name = name or _default_name(conv)
        with _quantizing(conv, types, workers or os.cpu_count() or 1, reporter, weights) as tensors:
            # the tensors are being read and quantized meanwhile (the tokenizer takes a second or two)
            template, tok = _metadata(conv, name, license=license, tags=tags, base_models=base_models,
                                      quantized_by=quantized_by, pre=pre_tokenizer, model_card=model_card,
                                      languages=languages)
            with output_files(out_dir, overwrite=overwrite) as tmp:
                writers, packed = {}, {}
                for q, spec in specs.items():
                    w = _Writer(tmp / f"{_file_stem(name)}-{q}.gguf", template.arch, split_bytes, packed)
                    for key, val in template.kv_data[0].items():
                        if key != gguf.Keys.General.ARCHITECTURE:
                            w.add_key_value(key, val.value, val.type, val.sub_type)
                    w.add_file_type(file_type(spec.base))
                    if im is not None and _quantized(spec.base):
                        for key, value in im.metadata().items():   # llama-quantize's kv overrides: after file_type
                            (w.add_string if isinstance(value, str) else w.add_uint32)(key, value)
                    _add_recipe(w, spec)
                    for plan, t in zip(conv.plan, types[q]):
                        w.add_tensor_info(plan.name, plan.shape, np.dtype(np.float32), _nbytes(plan.shape, t),
                                          raw_dtype=t)
                    writers[q] = w
                staged = {q: w.format_shard_names(w.path) for q, w in writers.items()}
                for paths in staged.values():   # fail before the work, not after it
                    for p in paths:
                        check_new(out_dir / p.name, overwrite, kind="file")
                for w in writers.values():
                    w.write_header_to_file()
                    w.write_kv_data_to_file()
                    w.write_ti_data_to_file()
                _write_tensors(conv, types, writers, tensors, reporter)
                for w in writers.values():
                    w.close()
                sizes = {q: sum(p.stat().st_size for p in paths) for q, paths in staged.items()}
        files = {q: [out_dir / p.name for p in paths] for q, paths in staged.items()}
    names = [p.name for p in conv.plan]
    return GGUFResult(out_dir, name, files, {q: dict(zip(names, (t.name for t in ts))) for q, ts in types.items()},
                      tok, time.perf_counter() - start, sizes,
                      im.metadata() if im is not None and any(map(_quantized, base.values())) else None)


def _check_patterns(specs, descs) -> None:
    """A --tensor-type pattern that finds no tensor llama-quantize would quantize is a mistake (a typo, another
    family's names): one line naming it and a tensor it could have meant."""
    names = [d.name for d in descs if allows_quantization(d)]
    for spec in specs:
        for pattern, _ in spec.tensor_types:
            if not any(re.search(pattern, n) for n in names):
                example = next((n for n in names if n.startswith("blk.")), names[0] if names else "")
                raise ConfigError(f"GGUF quant {spec.name}: tensor type pattern {pattern!r} matches no tensor of this "
                                  f"model (GGUF names such as {example}); fix the pattern")


def _quantized(quant: str) -> bool:
    """A llama-quantize type (F32/F16/BF16 files are written as convert_hf_to_gguf.py writes them)."""
    return DEFAULT_TYPE[quant] not in UNQUANTIZED


def _imatrix_weights(im: Imatrix, conv: Converter, types: dict[str, list[T]], base: dict[str, str],
                     reporter: Reporter) -> dict:
    """Tensor name -> the importance weights llama-quantize would use for it (only tensors a quantized file gives a
    type that takes weights). As llama.cpp: an entry of the wrong size is an error (the token embeddings' is ignored),
    a tensor without one is quantized without, and a Q2_K_S tensor needs one. An imatrix that matches no tensor at
    all is another model's: an error here (llama-quantize would quietly quantize without it)."""
    out, missing, wanted = {}, [], 0
    for i, plan in enumerate(conv.plan):
        quantized = [(q, ts[i]) for q, ts in types.items() if _quantized(base[q]) and ts[i] != T.F32]
        if not quantized:
            continue
        w = im.for_tensor(plan.name, plan.shape)   # llama.cpp looks every converted tensor up (size check included)
        for q, t in quantized:
            if w is None and requires_imatrix(base[q], plan.name, t):
                raise ImatrixError(f"imatrix {im.name} has no entry for {plan.name}, which {q} stores as {t.name}: "
                                   "llama-quantize refuses that (a very low-bit type needs one); compute the imatrix "
                                   "on this model")
        if any(t in WEIGHTED_TYPES for _, t in quantized) and plan.name not in ("token_embd.weight", "output.weight"):
            wanted += 1
            if w is None:
                missing.append(plan.name)
        if w is not None:
            out[plan.name] = w
    if wanted and len(missing) == wanted:
        raise ImatrixError(f"imatrix {im.name} has no entry for any tensor of this model (e.g. {missing[0]}; it has "
                           f"{', '.join(sorted(im.weights)[:2]) or 'no entries'}, ...): it was computed for another "
                           "model; compute it on this one")
    if missing:
        reporter.message(f"imatrix {im.name} has no entry for {len(missing)} tensor(s) ({', '.join(missing[:3])}"
                         f"{', ...' if len(missing) > 3 else ''}): quantized without importance weights, as "
                         "llama-quantize does")
    return out


RECIPE_NAME, RECIPE_BASE, RECIPE_ARGS = "quantize.recipe.name", "quantize.recipe.base", "quantize.recipe.args"
RECIPE_TARGET = "quantize.recipe.target"


def _add_recipe(w: gguf.GGUFWriter, spec: QuantSpec) -> None:
    """A custom recipe's name, base type, the target it was searched for, and the llama-quantize arguments that
    reproduce the file (a default one writes nothing: its bytes stay llama.cpp's)."""
    if not spec.is_default:
        w.add_string(RECIPE_NAME, spec.name)
        w.add_string(RECIPE_BASE, spec.base)
        if spec.target is not None:
            w.add_string(RECIPE_TARGET, str(spec.target))
        w.add_array(RECIPE_ARGS, spec.quantize_args())


AHEAD_BYTES = 1 << 27  # what the background stages may hold: float32 inputs not yet quantized + results not written


class _Budget:
    """Bytes held by the tensors in flight: ``take`` waits until ``n`` more fit (an empty budget admits anything) and
    says False once the pipeline stopped."""

    def __init__(self, limit: int):
        self.limit, self.used, self.stopped = limit, 0, False
        self.cond = threading.Condition()

    def take(self, n: int) -> bool:
        with self.cond:
            self.cond.wait_for(lambda: self.stopped or self.used == 0 or self.used + n <= self.limit)
            self.used += n
            return not self.stopped

    def give(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()


def _on_last(futures: list, callback) -> None:
    """Call ``callback()`` once every future of ``futures`` is done (at once when there are none)."""
    if not futures:
        callback()
        return
    left, lock = [len(futures)], threading.Lock()

    def one_done(_) -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            callback()

    for f in futures:
        f.add_done_callback(one_done)


@contextmanager
def _quantizing(conv: Converter, types: dict[str, list[T]], workers: int, reporter: Reporter,
                weights: dict[str, np.ndarray]) -> Iterator[Iterator[dict[T, np.ndarray]]]:
    """Start reading every tensor of ``conv.plan`` (one thread, in order) and quantizing it to each type ``types``
    needs for it (``workers`` threads; with the tensor's importance ``weights``, when it has some), ahead of the
    caller, within AHEAD_BYTES; yields an iterator over the results (type -> bytes) in plan order. A result counts
    against the budget until the next one is asked for. Leaving the block stops the background work."""
    k_types = {t for ts in types.values() for t in ts if t in kernels.K_TYPES or (weights and t in WEIGHTED_TYPES)}
    if k_types and kernels.needs_compile(k_types, bool(weights)):
        reporter.message("compiling quantization kernels (first run only)")
    budget = _Budget(AHEAD_BYTES)
    ready: queue.Queue = queue.Queue()
    needed = [list(dict.fromkeys(ts[i] for ts in types.values())) for i in range(len(conv.plan))]

    def feed() -> None:
        try:
            kernels.warm_up(k_types, bool(weights))   # compile or load the kernels while the caller reads the tokenizer
            for plan, ts in zip(conv.plan, needed):
                n_in = 4 * math.prod(plan.shape)
                n_out = sum(_nbytes(plan.shape, t) for t in ts)
                if not budget.take(n_in + n_out):
                    return
                data = conv.read(plan)
                futures = {t: kernels.submit(pool, data, t, weights.get(plan.name)) for t in ts}
                del data   # freed once its last chunk is quantized
                _on_last([f for fs in futures.values() for f in fs], lambda n=n_in: budget.give(n))
                ready.put((futures, n_out))
        except BaseException as e:   # noqa: BLE001 - handed to the consumer, which raises it
            ready.put(e)

    def results() -> Iterator[dict[T, np.ndarray]]:
        for _ in conv.plan:
            item = ready.get()
            if isinstance(item, BaseException):
                raise item
            futures, n_out = item
            yield {t: kernels.collect(fs) for t, fs in futures.items()}
            budget.give(n_out)   # the caller has written it

    with ThreadPoolExecutor(workers) as pool, ThreadPoolExecutor(1) as reader:
        feeding = reader.submit(feed)
        try:
            yield results()
        finally:
            budget.stop()
            while not feeding.done() or not ready.empty():   # cancel what was queued, let the feeder finish
                try:
                    item = ready.get(timeout=0.05)
                except queue.Empty:
                    continue
                if not isinstance(item, BaseException):
                    for fs in item[0].values():
                        for f in fs:
                            f.cancel()


def _write_tensors(conv: Converter, types: dict[str, list[T]], writers: dict,
                   tensors: Iterator[dict[T, np.ndarray]], reporter: Reporter) -> None:
    """Write the quantized tensors of :func:`_quantized` (``tensors``) in plan order as they come."""
    with reporter.progress("GGUF export", len(conv.plan)) as advance:
        for i, (plan, results) in enumerate(zip(conv.plan, tensors)):
            for q, w in writers.items():
                w.write_tensor_data(results[types[q][i]])
            del results
            advance(1, description=f"GGUF export: {plan.name}")
