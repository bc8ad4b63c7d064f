"""The streaming merge engine: per output tensor read only its inputs, merge, write; bounded memory, work overlapped."""

from __future__ import annotations

import gc
import json
import os
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import CheckpointWriter
from ..checkpoint.writer import DEFAULT_SHARD_BYTES
from ..errors import ConfigError, ModelError, OutputError
from ..stage import Reporter
from .config import MergeConfig, mergekit_yaml, parse_config
from . import scratch
from .params import refuse_warnings
from .planner import MergePlan, TensorJob, plan_merge

TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
DEFAULT_MEMORY = 1 << 29  # bytes of input tensors in flight at once (one larger tensor is always allowed)


@dataclass
class MergeResult:
    out_dir: Path
    method: str
    tensors: int
    bytes_written: int
    seconds: float
    files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda or auto")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    return torch.device(device)


def merge_tensor(plan: MergePlan, job: TensorJob, device: torch.device) -> torch.Tensor:
    """Read the inputs of one output tensor, cast them to the config dtype, merge, cast to the output dtype."""
    tensors = []
    for mi, name in job.sources:
        t = plan.readers[mi].map(name)
        if device.type != "cpu":
            t = t.to(device, non_blocking=True)
        tensors.append(scratch.cast(t, job.compute_dtype))
    if job.vocab:
        tensors = plan.vocab.align(tensors, [mi for mi, _ in job.sources], job.base_index)
    generator = torch.Generator(device=device).manual_seed(job.seed) if job.seed is not None else None
    experts = plan.arch.experts
    pieces = experts.pieces(job.name, job.shape, plan.arch.layer_prefix) if experts is not None else None
    if pieces:   # fused or stacked experts (mergekit's output layout) merge expert by expert, as per-expert ones do
        out = torch.empty(job.shape, dtype=tensors[0].dtype, device=tensors[0].device)
        for index in pieces:
            out[index] = plan.method.fn([t[index] for t in tensors], job.base_index, job.params, job.model_params,
                                        generator)
    else:
        out = plan.method.fn(tensors, job.base_index, job.params, job.model_params, generator)
    if tuple(out.shape) != job.shape:
        out = out.reshape(job.shape)
    out = scratch.cast(out, job.dtype)
    if out.is_floating_point() and out.numel() and not _finite(out):
        inputs = ", ".join(plan.labels[mi] if plan.labels else plan.models[mi] for mi, _ in job.sources)
        raise ModelError(f"merged tensor {job.name} has NaN or infinite values (inputs: {inputs}); check the inputs "
                         f"and the merge parameters (or a narrower out_dtype overflowing); nothing was written")
    return out.cpu()


def _finite(t: torch.Tensor) -> bool:
    """No NaN or infinity in ``t``: min and max in one pass (NaN propagates), much faster than isfinite().all()."""
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low) & torch.isfinite(high))


class _Budget:
    """Bounds the bytes of input tensors held by jobs in flight (a job larger than the budget runs alone)."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self.cond = threading.Condition()

    def acquire(self, n: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.used == 0 or self.used + n <= self.limit)
            self.used += n

    def release(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()


def execute(plan: MergePlan, writer: CheckpointWriter, device: torch.device, *, workers: int | None = None,
            memory: int = DEFAULT_MEMORY, on_done=None) -> None:
    """Run every job of ``plan`` on a thread pool (reads, math and writes of different tensors overlap)."""
    workers = workers or max(2, min(4, (os.cpu_count() or 2) + 1))
    budget = _Budget(memory)
    failed = threading.Event()

    buffers = scratch.Pool(2 * memory) if device.type == "cpu" else None

    def run(job: TensorJob, n: int) -> None:
        try:
            if not failed.is_set():
                with scratch.job(buffers):   # the job's temporaries are reused by the next jobs
                    writer.write(job.name, merge_tensor(plan, job, device))
                if on_done:
                    on_done(job)
        except BaseException:
            failed.set()
            raise
        finally:
            budget.release(n)

    # largest first keeps the pool busy at the end; the budget keeps memory bounded
    order = sorted(plan.jobs, key=lambda j: -j.input_bytes(plan))
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # parallel over tensors, not inside each op: no oversubscription
    gc.freeze()   # the objects of the imports (torch's are many) are long-lived: keep the collector off them
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="merge") as pool:
            futures = []
            for job in order:
                n = job.input_bytes(plan)
                budget.acquire(n)
                if failed.is_set():
                    budget.release(n)
                    break
                futures.append(pool.submit(run, job, n))
    finally:
        torch.set_num_threads(threads)
        gc.unfreeze()
        if buffers is not None:
            buffers.clear()
    for f in futures:
        if f.exception() is not None:
            raise f.exception()


def _chat_template(config: MergeConfig, plan: MergePlan) -> str | None:
    value = config.chat_template
    if value is None:
        return None
    if value == "auto":
        found = [t for t in (_read_template(Path(m)) for m in plan.models) if t]
        if not found:
            raise ConfigError("chat_template: auto found no chat template in the input models; name one (e.g. chatml)")
        return Counter(found).most_common(1)[0][0]
    if "{" in value:
        return value
    from ..tokenizer.templates import load_template  # named built-in template
    return load_template(value).source


def _read_template(folder: Path) -> str | None:
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    try:
        return json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    except (OSError, ValueError):
        return None


def _write_side_files(writer: CheckpointWriter, config: MergeConfig, plan: MergePlan, yaml_text: str) -> None:
    writer.add_file("config.json", json.dumps(plan.out_config, indent=2) + "\n")
    template = _chat_template(config, plan)
    donor = Path(plan.models[plan.donor])
    if plan.vocab is not None and plan.vocab.folder is None:   # a built (union or stripped) tokenizer
        with tempfile.TemporaryDirectory() as tmp:
            if template is not None:
                plan.vocab.tokenizer.chat_template = template
            plan.vocab.tokenizer.save_pretrained(tmp)
            for f in sorted(Path(tmp).iterdir()):
                writer.copy_file(f)
        template = None
    else:
        if plan.vocab is not None:
            donor = Path(plan.vocab.folder)
        for name in TOKENIZER_FILES:
            src = donor / name
            if not src.is_file() or (template is not None and name in ("chat_template.jinja", "chat_template.json")):
                continue
            if name == "tokenizer_config.json" and template is not None:
                data = json.loads(src.read_text())
                data.pop("chat_template", None)
                writer.add_file(name, json.dumps(data, indent=2) + "\n")
            else:
                writer.copy_file(src)
    gen = Path(plan.models[plan.donor]) / "generation_config.json"
    if gen.is_file():
        writer.copy_file(gen)
    if template is not None:
        writer.add_file("chat_template.jinja", template)
    text = mergekit_yaml(yaml_text)
    writer.add_file("mergekit_config.yml", text if text.endswith("\n") else text + "\n")


def _check_output(out_dir: Path, plan: MergePlan) -> None:
    out = out_dir.resolve()
    for m in plan.models:
        src = Path(m).resolve()
        if out == src or out in src.parents:
            raise OutputError(f"output folder {out_dir} would replace input model {m}; choose another output folder")


def run_merge(config: str | Path | dict, out_dir: str | Path, *, base_dir: str | Path | None = None,
              device: str = "cpu", overwrite: bool = False,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES, reporter: Reporter | None = None,
              workers: int | None = None, memory: int = DEFAULT_MEMORY, strict: bool = False) -> MergeResult:
    """Merge the models described by a mergekit YAML config (a path or a parsed dict) into ``out_dir``. Relative
    model paths are taken from the config file's folder, or from ``base_dir``. Warnings (e.g. a filter that matches
    no tensor, a parameter the method ignores) go to ``reporter`` and into the result; ``strict`` makes them errors."""
    start = time.perf_counter()
    reporter = reporter or Reporter()
    cfg, yaml_text = parse_config(config, base_dir=Path(base_dir) if base_dir is not None else None)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise OutputError(f"{out_dir} already exists; pass --overwrite to replace it or choose a new folder")
    dev = resolve_device(device)
    plan = plan_merge(cfg)
    try:
        refuse_warnings(plan.warnings, strict)
        for text in plan.warnings:
            reporter.warning(text)
        _check_output(out_dir, plan)
        specs = [(j.name, j.dtype, j.shape) for j in plan.jobs]
        with CheckpointWriter(out_dir, specs, max_shard_bytes=max_shard_bytes, overwrite=overwrite) as writer:
            _write_side_files(writer, cfg, plan, yaml_text)
            with reporter.progress(f"merging ({plan.method.name})", len(plan.jobs)) as advance:
                execute(plan, writer, dev, workers=workers, memory=memory, on_done=lambda job: advance())
            writer.commit()
            files = sorted(p.name for p in out_dir.iterdir())
            return MergeResult(out_dir, plan.method.name, len(plan.jobs), writer.total_bytes,
                               time.perf_counter() - start, files, list(plan.warnings))
    finally:
        plan.close()
