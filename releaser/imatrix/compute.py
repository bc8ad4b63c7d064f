"""The importance matrix of a Hugging Face model folder, computed in torch as llama-imatrix computes it on the model's
GGUF (tools/imatrix/imatrix.cpp): the text is tokenized once (BOS first when the tokenizer adds one), cut into
``chunks`` chunks of ``ctx`` tokens (each chunk's first token replaced by BOS when the tokenizer adds one), each chunk
run as its own sequence; for every weight matrix of the decoder blocks that becomes a GGUF tensor, the sum over
tokens of each input column's squared activation, and the count of tokens summed. A mixture-of-experts tensor
keeps one row of sums and one count per expert (the tokens routed to it); the router is a dense matrix of its own.
``output.weight`` only with ``process_output`` (and only when the model has its own, untied lm_head).

The model runs streamed in float32 (``releaser.quality.load.streamed``: one decoder layer's weights in memory at a
time), on batches of whole chunks: two models side by side take the next batch each, on half the cores each (as
llama.cpp's threads take the next piece of work, a core shared with another process slows one model, not both), and
each batch's sums are added to the total in batch order, so the bytes do not depend on the timing. Under an executor
(``--executor ray``) each batch is a task of its own, on any node, that writes its batch's float64 sums to a file; the
caller adds them in the same order: the same bytes. Inputs shared by several matrices (q/k/v, gate/up) are squared and
summed once."""

from __future__ import annotations

import ctypes
import math
import os
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..arch import architecture_for
from ..checkpoint.config import check_unquantized
from ..errors import ConfigError, ModelError
from ..stage import Reporter
from .file import Entry, Imatrix
from .options import ImatrixOptions
from .text import CalibrationText, load_calibration, token_ids

PASS_TOKENS = 4096   # tokens per forward pass (whole chunks); each pass reads every layer's weights once
ROWS = 512           # rows squared and summed at a time
WORKERS = 2          # models running batches side by side, each on cores / WORKERS threads: no thread of one waits
#                      at the other's barriers (one parallel pass loses most of a core to a busy neighbour)


@dataclass
class ImatrixResult:
    imatrix: Imatrix
    text: CalibrationText
    chunks: int
    tokens: int           # tokens run through the model (chunks x ctx)
    text_tokens: int      # tokens the whole text has
    seconds: float

    @property
    def facts(self) -> dict:
        return {"dataset": self.text.name, "dataset_sha256": self.text.sha256, "chunks": self.chunks,
                "chunk_size": self.imatrix.chunk_size, "tokens": self.tokens, "text_tokens": self.text_tokens,
                "conversations": self.text.conversations, "chat_template": self.text.templated,
                "entries": len(self.imatrix.entries)}


class _Sums:
    """Per GGUF tensor: float64 sums [n_mat, n_cols] and int64 counts [n_mat]; squares of one input computed once."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, np.ndarray] = {}
        self._last: tuple | None = None

    def register(self, name: str, cols: int, n_mat: int = 1) -> None:
        self.sums[name] = torch.zeros(n_mat, cols, dtype=torch.float64)
        self.counts[name] = np.zeros(n_mat, dtype=np.int64)

    def take(self) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
        """The sums and counts so far; they start again from zero."""
        out = (self.sums, self.counts)
        self.sums = {n: torch.zeros_like(t) for n, t in out[0].items()}
        self.counts = {n: np.zeros_like(c) for n, c in out[1].items()}
        self._last = None
        return out

    def fold(self, sums: dict[str, torch.Tensor], counts: dict[str, np.ndarray]) -> None:
        for n, t in sums.items():
            if n in self.sums:
                self.sums[n] += t
                self.counts[n] += counts[n]
            else:
                self.sums[n], self.counts[n] = t.clone(), counts[n].copy()

    def squares(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(sum over tokens of x**2 per column, tokens) of x [..., cols], cached for the next matrix reading x."""
        if self._last is None or self._last[0] is not x:   # the cache holds x itself: its memory cannot be reused
            flat = x.detach().reshape(-1, x.shape[-1])
            acc = torch.zeros(flat.shape[1], dtype=torch.float64)
            for block in flat.split(ROWS):   # small temporaries stay in the cache (a whole-pass one: 5-50x slower)
                block = block.float()
                acc += (block * block).sum(0)   # float32 within a block, float64 across
            self._last = (x, acc, flat.shape[0])
        return self._last[1], self._last[2]

    def add(self, name: str, x: torch.Tensor, row: int = 0) -> None:
        s, n = self.squares(x)
        self.sums[name][row] += s
        self.counts[name][row] += n

    def result(self) -> dict[str, Entry]:
        return {n: Entry(self.sums[n].to(torch.float32).numpy(), self.counts[n].copy()) for n in self.sums}


def _experts_forward(sums: _Sums, names: tuple[str, str, str]):
    """The eager forward of transformers' fused experts module (``gate_up_proj`` [E, 2 ff, hidden], ``down_proj``
    [E, hidden, ff]: Qwen3-MoE's), recording each expert's inputs: the tokens routed to it for gate and up, their
    ``act(gate) * up`` for down."""
    gate, up, down = names

    def forward(self, hidden_states, top_k_index, top_k_weights):
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit[:, 0].tolist():
            if e == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(mask[e])
            state = hidden_states[token_idx]
            sums.add(gate, state, e)
            sums.add(up, state, e)
            g, u = torch.nn.functional.linear(state, self.gate_up_proj[e]).chunk(2, dim=-1)
            h = self.act_fn(g) * u
            sums.add(down, h, e)
            out = torch.nn.functional.linear(h, self.down_proj[e]) * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final

    return forward


def _instrument(model, family, config: dict, shapes: dict, sums: _Sums, process_output: bool, tied: bool) -> None:
    """Hooks on every block matrix with a GGUF name (linear layers and routers, ``shapes`` giving the weights' HF
    shapes: their input; fused experts: their forward) and, with ``process_output``, on the final norm (the input of
    output.weight)."""
    n_layer = config[family.num_layers_key]
    table = family.gguf_name_map(n_layer)

    def gguf_name(hf: str) -> str | None:
        return table.get_name(hf, try_suffixes=(".weight", ".bias"))

    experts = family.experts
    for name, module in model.named_modules():
        layer = family.layer_of(name + ".")
        if layer is None:
            continue
        if experts is not None and name == f"{family.layer_prefix}{layer}.{experts.module}":
            if not all(hasattr(module, a) for a in ("gate_up_proj", "down_proj", "act_fn", "num_experts")):
                raise ModelError(f"the experts of {family.label} are not the fused module releaser imatrix knows "
                                 f"({type(module).__name__}); this transformers version is not supported")
            names = tuple(gguf_name(experts.stacked_name(family.layer_prefix, layer, lin)) for lin in experts.linears)
            hidden, ff = config["hidden_size"], config[experts.ff_key]
            for gname, cols in zip(names, (hidden, hidden, ff)):
                sums.register(gname, cols, int(experts.count(config)))
            module.forward = types.MethodType(_experts_forward(sums, names), module)
            continue
        shape = shapes.get(name + ".weight")
        if shape is None or len(shape) != 2:   # norms are vectors; experts are handled above
            continue
        gname = gguf_name(name + ".weight")
        if gname is None or not gname.startswith("blk."):
            continue
        sums.register(gname, int(shape[1]))
        module.register_forward_pre_hook(lambda m, args, g=gname: sums.add(g, args[0]))
    if process_output and not tied:
        sums.register("output.weight", config["hidden_size"])
        model.model.norm.register_forward_hook(lambda m, args, out: sums.add("output.weight", out))


@contextmanager
def _heap_reuse():
    """Large temporaries (a pass's activations, tens of MB) reused from glibc's heap instead of a fresh mapping each,
    whose pages are faulted in and zeroed again on every allocation (above glibc's 32 MB dynamic limit that is every
    time); the memory goes back to the system after."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:   # not glibc
        libc = None
    if libc is not None:
        libc.mallopt(-3, 512 << 20)   # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)     # M_TRIM_THRESHOLD
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(-3, 32 << 20)    # the largest threshold glibc's own adjustment reaches
            libc.mallopt(-1, 64 << 20)    # and its trim threshold
            libc.malloc_trim(0)


def chunk_tokens(ids: list[int], ctx: int, chunks: int | None, bos: int | None, where: str) -> torch.Tensor:
    """[n, ctx] chunks of ``ids`` as llama-imatrix cuts them (it needs at least two chunks' worth of tokens)."""
    if len(ids) < 2 * ctx:
        raise ConfigError(f"the calibration text {where} has {len(ids)} tokens; llama-imatrix needs at least "
                          f"{2 * ctx} for a context of {ctx}: give a longer text or a smaller --ctx")
    n = len(ids) // ctx if chunks is None else min(chunks, len(ids) // ctx)
    tokens = torch.tensor(ids[: n * ctx], dtype=torch.long).view(n, ctx)
    if bos is not None:
        tokens[:, 0] = bos
    return tokens


def _open_model(model_dir: Path):
    """The weights (headers read, no tensor yet), config and family of the model folder ``model_dir``, checked."""
    from ..quality.load import FolderWeights

    weights = FolderWeights(model_dir)
    config = weights.config
    check_unquantized(config, model_dir, "an importance matrix")
    return weights, config, architecture_for(config, str(model_dir), stage="gguf")


def _collecting(weights, config: dict, family, process_output: bool, advance=lambda: None):
    """A streamed model of ``weights`` whose matrices' inputs are summed into a :class:`_Sums` of its own (build one
    at a time: transformers' model construction is not thread-safe; CheckpointReader.read is)."""
    from ..quality.load import streamed

    sums = _Sums()
    model = streamed(weights, advance)
    _instrument(model, family, config, weights.shapes(), sums, process_output, family.tied(config, weights.names))
    return model, sums


def _run_batch(model, sums: _Sums, tokens: torch.Tensor) -> tuple[dict, dict]:
    """The sums and counts of one batch of whole chunks ``tokens`` [n, ctx]: the same computation in this process and
    in an executor's task."""
    with torch.no_grad():
        model.model(tokens, use_cache=False)
    return sums.take()


def compute_imatrix(options: ImatrixOptions, model_dir: str | os.PathLike, reporter: Reporter | None = None, *,
                    run_tasks=None, parts: str | os.PathLike | None = None, keep: bool = False) -> ImatrixResult:
    """The importance matrix of ``model_dir`` on ``options.text`` (see the module docstring). ``run_tasks``
    (:mod:`releaser.tasks`; an executor: Ray): one task per batch, each writing its batch's sums and counts into a file
    in the folder ``parts`` (on a file system every node sees; removed after), which are added here in batch order, as
    in this process: the same bytes. ``keep``: each batch's file is kept in ``parts`` with its result (a release's
    units folder), and a batch a killed run finished there is taken, not run again."""
    from ..quality.text import adds_bos
    from ..tokenizer.model import load_tokenizer

    reporter = reporter or Reporter()
    model_dir = Path(model_dir)
    start = time.perf_counter()
    weights, config, family = _open_model(model_dir)
    with weights:
        tokenizer = load_tokenizer(model_dir, "the imatrix calibration")
        text = load_calibration(options.text, tokenizer, options.parse_special)
        if text.conversations and not text.templated:
            reporter.warning(f"{model_dir.name} has no chat template: the calibration conversations are written as "
                             "plain 'User:' / 'Assistant:' turns")
        ids = token_ids(tokenizer, text)
        tokens = chunk_tokens(ids, options.ctx, options.chunks, adds_bos(tokenizer), repr(text.name))
        per_pass = max(1, PASS_TOKENS // options.ctx)
        batches = [tokens[at: at + per_pass] for at in range(0, tokens.shape[0], per_pass)]
        if options.process_output and family.tied(config, weights.names):
            reporter.warning("the model's output matrix is its token embedding (tied): there is no output.weight to "
                             "collect (llama-imatrix --process-output collects none either)")
        where = f"imatrix of {model_dir.name} ({family.label}) on {tokens.shape[0]} chunks x {options.ctx} tokens of " \
                f"{text.name}"
        if run_tasks is None:
            total = _in_process(options, weights, config, family, batches, where, reporter)
    if run_tasks is not None:
        total = _in_tasks(options, model_dir, batches, Path(parts), run_tasks, where, reporter, keep)
    imatrix = Imatrix(total.result(), [text.name], int(tokens.shape[0]), options.ctx, [text.sha256])
    return ImatrixResult(imatrix, text, int(tokens.shape[0]), int(tokens.numel()), len(ids),
                         time.perf_counter() - start)


def _in_process(options: ImatrixOptions, weights, config: dict, family, batches: list[torch.Tensor], where: str,
                reporter: Reporter) -> _Sums:
    """The batches on two models side by side in this process, each batch's sums added to the total in batch order."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(1, min(WORKERS, cores, len(batches)))
    torch.set_num_threads(max(1, cores // workers))
    n_layer = config[family.num_layers_key]
    reporter.message(f"{where} (cpu, {workers} x {torch.get_num_threads()} threads)")
    total, done, lock = _Sums(), {}, threading.Lock()
    order, folded = iter(range(len(batches))), [0]

    def work(model, sums: _Sums) -> None:
        """Run the next batch of chunks until none is left; each batch's sums are added to the total in batch order
        (the same bytes whatever the timing)."""
        while True:
            with lock:
                i = next(order, None)
            if i is None:
                return
            taken = _run_batch(model, sums, batches[i])
            with lock:
                done[i] = taken
                while folded[0] in done:
                    total.fold(*done.pop(folded[0]))
                    folded[0] += 1

    with _heap_reuse(), reporter.progress("imatrix", total=len(batches) * n_layer) as advance:
        runners = [_collecting(weights, config, family, options.process_output, advance) for _ in range(workers)]
        with ThreadPoolExecutor(workers) as pool:
            for f in [pool.submit(work, *r) for r in runners]:
                f.result()
    return total


TASK_THREADS = 1   # torch threads of one batch's task (its Ray num_cpus): the cluster's nodes take batches side by side


def _in_tasks(options: ImatrixOptions, model_dir: Path, batches: list[torch.Tensor], parts: Path, run_tasks,
              where: str, reporter: Reporter, keep: bool = False) -> _Sums:
    """One task per batch through ``run_tasks``, each writing its sums into its folder in ``parts`` (kept there with
    its result when ``keep``); added here in batch order."""
    from ..atomic import remove
    from ..tasks import Task

    size = batch_resources(model_dir, options.ctx, int(batches[0].shape[0]))
    reporter.message(f"{where} ({len(batches)} task(s) of up to {batches[0].shape[0]} chunks, {TASK_THREADS} "
                     f"thread(s) each, {size.memory / 2**30:.1f} GiB)")
    first = [0]
    for b in batches:
        first.append(first[-1] + int(b.shape[0]))
    tasks = [Task(f"chunks {first[i] + 1}-{first[i + 1]}", "releaser.imatrix.compute:batch_sums",
                  (str(model_dir), b.clone(), str(parts / part_name(i)), options.process_output),
                  {"threads": TASK_THREADS}, size,   # clone: a view would send the whole text's tokens
                  str((parts / part_name(i)).parent) if keep else None)
             for i, b in enumerate(batches)]
    try:
        run_tasks(tasks)
        total = _Sums()
        for i in range(len(batches)):
            total.fold(*load_sums(parts / part_name(i)))
    finally:
        if not keep:   # kept: the release removes its units once the stage is recorded
            remove(parts)
    return total


def part_name(batch: int) -> str:
    return f"batch-{batch:05d}/sums.npz"


def batch_sums(model_dir: str, tokens: torch.Tensor, out: str, process_output: bool, threads: int = TASK_THREADS, *,
               reporter: Reporter | None = None) -> str:
    """One task: the sums and counts of the batch of chunks ``tokens`` [n, ctx] through the model folder
    ``model_dir``, written to the file ``out`` through :mod:`releaser.atomic` (a task run again after its node died
    replaces a half-written file with the same bytes)."""
    torch.set_num_threads(threads)
    weights, config, family = _open_model(Path(model_dir))
    with weights, _heap_reuse():
        model, sums = _collecting(weights, config, family, process_output)
        save_sums(Path(out), *_run_batch(model, sums, tokens))
    return out


def save_sums(path: Path, sums: dict[str, torch.Tensor], counts: dict[str, np.ndarray]) -> None:
    """One batch's float64 sums and int64 counts as an .npz, in their order (the order of the file's entries)."""
    from ..atomic import OutputLock, os_error, sweep, temp_file

    names = list(sums)
    arrays = {"names": np.array(names, dtype=str)}
    for j, n in enumerate(names):
        arrays[f"s{j}"], arrays[f"c{j}"] = sums[n].numpy(), counts[n]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(exc, path) from exc
    with OutputLock(path):
        sweep(path)
        with temp_file(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def load_sums(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
    with np.load(path, allow_pickle=False) as z:
        names = [str(n) for n in z["names"]]
        return ({n: torch.from_numpy(z[f"s{j}"]) for j, n in enumerate(names)},
                {n: z[f"c{j}"] for j, n in enumerate(names)})


def batch_resources(model_dir: str | os.PathLike, ctx: int, chunks: int):
    """What one batch's task holds, from the tensor shapes and the config: the process; the tensors outside the decoder
    layers and twice the largest layer in float32 (streamed: one layer at a time, read from its stored type); a pass's
    activations (each token's hidden states and MLP intermediates, each chunk's attention scores) and the float64 sums
    twice. Not the whole model: a 70B's batch fits a node with a fraction of its 280 GB in float32."""
    from ..checkpoint import CheckpointReader
    from ..quality.load import LAYER
    from ..tasks import PROCESS_BYTES, Resources

    resident, layers, inputs = 0, {}, 0
    with CheckpointReader(model_dir) as reader:
        config = reader.config
        for name, t in reader.tensors.items():
            size = 4 * math.prod(t.shape)
            m = LAYER.match(name)
            if m is None:
                resident += size
            else:
                layers[m["i"]] = layers.get(m["i"], 0) + size
                if len(t.shape) >= 2:
                    inputs += math.prod(t.shape) // t.shape[-2]   # a sum per input column (per expert)
    hidden = int(config.get("hidden_size") or 0)
    ff = int(config.get("intermediate_size") or 4 * hidden)
    heads = int(config.get("num_attention_heads") or 1)
    tokens = chunks * ctx
    activations = 4 * tokens * (8 * hidden + 4 * ff) + 8 * chunks * heads * ctx * ctx
    memory = PROCESS_BYTES + resident + 2 * max(layers.values(), default=0) + activations + 16 * inputs
    return Resources(cpus=TASK_THREADS, memory=memory)
