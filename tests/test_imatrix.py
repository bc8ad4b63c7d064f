"""releaser imatrix against llama.cpp's llama-imatrix (tests/build_llama_tools.sh builds it from the vendored source):
the same text and chunks on the F32 GGUF of the same model give the same sums (SmolLM2-135M; a tiny Qwen3-MoE for the
per-expert sums and counts), llama-imatrix's own files are read, merged and written back byte for byte (GGUF and the
legacy .dat), ``read_imatrix`` gives what llama-quantize passes to its quantization functions, and bad input
(another model's imatrix, a truncated file) is one line."""

from __future__ import annotations

import hashlib
import shutil
import subprocess

import numpy as np
import pytest

from releaser.errors import ConfigError, ModelError, OutputError
from releaser.imatrix.compute import compute_imatrix
from releaser.imatrix.file import SHA_KEY, Imatrix, check_model, merge, read, read_imatrix, write
from releaser.imatrix.options import ImatrixOptions
from releaser.imatrix.text import BUILTIN_NAME, load_calibration
from releaser.tokenizer.model import load_tokenizer

CHUNKS = 4
F32_PATH = ["-fa", "off", "-ctk", "f32", "-ctv", "f32"]   # llama.cpp's float32 attention (default: F16 KV cache)


def llama_imatrix(tools, *args, cwd=None) -> None:
    proc = subprocess.run([str(tools / "llama-imatrix"), *map(str, args)], capture_output=True, text=True, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-2000:]


def rel_error(ours: np.ndarray, ref: np.ndarray) -> float:
    """The largest difference relative to the tensor's largest value (llama.cpp sums in float32, token by token)."""
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def assert_same(ours: Imatrix, ref: Imatrix, tol: float) -> float:
    assert sorted(ours.entries) == sorted(ref.entries)
    worst = 0.0
    for name, e in ref.entries.items():
        o = ours.entries[name]
        assert o.sums.shape == e.sums.shape, name
        assert o.counts.tolist() == e.counts.tolist(), name
        worst = max(worst, rel_error(o.sums, e.sums))
        assert rel_error(o.sums, e.sums) <= tol, (name, rel_error(o.sums, e.sums))
    assert (ours.chunk_count, ours.chunk_size) == (ref.chunk_count, ref.chunk_size)
    return worst


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory, smollm2, llama_tools):
    """Our imatrix of SmolLM2 on the builtin conversations, the rendered text as a file, llama-imatrix's on the F32
    GGUF (default and float32 attention) with the same text and chunks."""
    from releaser.gguf import export_gguf

    root = tmp_path_factory.mktemp("imatrix")
    gguf = export_gguf(smollm2, root, ["F32"], name="SmolLM2").files["F32"][0]
    result = compute_imatrix(ImatrixOptions(chunks=CHUNKS), smollm2)
    ours = write(result.imatrix, root / "ours-imatrix.gguf")
    text = root / "calibration.txt"
    text.write_text(result.text.text + "\n", encoding="utf-8")   # -f drops one trailing newline
    common = ["-m", gguf, "-f", text.name, "--chunks", CHUNKS, "-c", 512, "--parse-special"]
    llama_imatrix(llama_tools, *common, "-o", root / "llama.gguf", cwd=root)
    llama_imatrix(llama_tools, *common, *F32_PATH, "-o", root / "llama-f32.gguf", cwd=root)
    return {"root": root, "ours": ours, "result": result, "gguf": gguf, "text": text,
            "llama": root / "llama.gguf", "llama_f32": root / "llama-f32.gguf"}


def test_smollm2_equals_llama_imatrix(smollm2_run):
    """Every block matrix llama-imatrix collects, with the same counts; sums within 1e-3 of llama-imatrix's default
    run (its F16 KV cache) and within 2e-5 of its float32 attention path."""
    ours = read(smollm2_run["ours"])
    assert len(ours.entries) == 30 * 7
    assert_same(ours, read(smollm2_run["llama"]), 1e-3)
    assert_same(ours, read(smollm2_run["llama_f32"]), 2e-5)
    assert ours.entries["blk.0.attn_q.weight"].counts.tolist() == [CHUNKS * 512]
    result = smollm2_run["result"]
    assert ours.datasets == [BUILTIN_NAME] and ours.sha256 == [result.text.sha256]
    assert result.text.sha256 == hashlib.sha256(result.text.text.encode()).hexdigest()
    assert result.facts["dataset_sha256"] == result.text.sha256 and result.text.templated
    assert "<|im_start|>assistant" in result.text.text   # chat-shaped: rendered through SmolLM2's template


def test_file_layout_is_llama_imatrix_byte_for_byte(smollm2_run, tmp_path):
    """Read and written again, llama-imatrix's file is the same bytes; ours differs only by the sha256 key."""
    for name in ("llama", "llama_f32"):
        write(read(smollm2_run[name]), tmp_path / "again.gguf")
        assert (tmp_path / "again.gguf").read_bytes() == smollm2_run[name].read_bytes()
    from releaser.gguf.reader import GGUFFile

    values = dict(GGUFFile(smollm2_run["ours"]).values)
    assert values[SHA_KEY] == [smollm2_run["result"].text.sha256] and values["general.type"] == "imatrix"
    assert list(values)[:4] == ["general.type", "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"]


def test_merge_equals_llama_imatrix_in_file(smollm2_run, llama_tools, tmp_path):
    """Two files merged (sums and counts add) are byte for byte llama-imatrix --in-file a --in-file b."""
    a, b = smollm2_run["llama"], smollm2_run["llama_f32"]
    llama_imatrix(llama_tools, "-m", smollm2_run["gguf"], "--in-file", a, "--in-file", b, "-o", tmp_path / "ref.gguf")
    write(merge([read(a), read(b)]), tmp_path / "ours.gguf")
    assert (tmp_path / "ours.gguf").read_bytes() == (tmp_path / "ref.gguf").read_bytes()
    merged = merge([read(smollm2_run["ours"]), read(a)])
    e = merged.entries["blk.3.ffn_down.weight"]
    assert e.counts.tolist() == [2 * CHUNKS * 512] and merged.chunk_count == 2 * CHUNKS
    assert merged.sha256 == [smollm2_run["result"].text.sha256, ""]   # llama.cpp's file records no hash


def test_legacy_dat_read_write_and_convert(smollm2_run, llama_tools, tmp_path):
    """llama-imatrix --output-format dat: read (the same importance as the GGUF), written by us byte for byte, and
    turned back into GGUF as llama-imatrix --in-file x.dat does."""
    src = smollm2_run["llama"]
    llama_imatrix(llama_tools, "-m", smollm2_run["gguf"], "--in-file", src, "--output-format", "dat", "-o", tmp_path / "ref.dat")
    dat = read(tmp_path / "ref.dat")
    assert dat.legacy and dat.datasets == ["calibration.txt"] and dat.chunk_count == CHUNKS
    write(merge([read(src)]), tmp_path / "ours.dat")
    assert (tmp_path / "ours.dat").read_bytes() == (tmp_path / "ref.dat").read_bytes()
    gguf_values, dat_values = read_imatrix(src), read_imatrix(tmp_path / "ref.dat")
    assert sorted(gguf_values) == sorted(dat_values)
    for name, v in gguf_values.items():
        np.testing.assert_allclose(dat_values[name], v, rtol=1e-6)
    llama_imatrix(llama_tools, "-m", smollm2_run["gguf"], "--in-file", tmp_path / "ref.dat", "-o", tmp_path / "back.gguf")
    write(merge([dat]), tmp_path / "ours-back.gguf")
    assert (tmp_path / "ours-back.gguf").read_bytes() == (tmp_path / "back.gguf").read_bytes()


def test_read_imatrix_is_what_llama_quantize_uses(smollm2_run):
    """in_sum2 / count per expert, float32, flattened expert-major (llama-quantize's load_imatrix)."""
    values = read_imatrix(smollm2_run["llama"])
    raw = read(smollm2_run["llama"])
    assert len(values) == 210
    v = values["blk.7.ffn_up.weight"]
    e = raw.entries["blk.7.ffn_up.weight"]
    assert v.dtype == np.float32 and v.shape == (576,)
    assert np.array_equal(v, e.sums[0] / np.float32(e.counts[0]))


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory, smollm2, llama_tools):
    """A tiny Qwen3-MoE (4 experts, 2 per token) with SmolLM2's tokenizer: ours and llama-imatrix's, 6 chunks of 64."""
    from releaser.gguf import export_gguf
    from releaser_testing import tiny_family_model

    root = tmp_path_factory.mktemp("imatrix-moe")
    model = tiny_family_model(root / "moe", "qwen3moe", seed=0)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(smollm2 / f, model / f)
    gguf = export_gguf(model, root, ["F32"], name="tiny-moe").files["F32"][0]
    options = ImatrixOptions(chunks=6, ctx=64, process_output=True)   # untied: output.weight too
    result = compute_imatrix(options, model)
    (root / "text.txt").write_text(result.text.text + "\n", encoding="utf-8")
    llama_imatrix(llama_tools, "-m", gguf, "-f", "text.txt", "--chunks", 6, "-c", 64, "--parse-special", *F32_PATH,
                  "--process-output", "-o", root / "llama.gguf", cwd=root)
    return {"model": model, "ours": result.imatrix, "llama": read(root / "llama.gguf"), "root": root}


def test_moe_per_expert_sums_and_counts_equal_llama_imatrix(tiny_moe):
    ours, ref = tiny_moe["ours"], tiny_moe["llama"]
    assert_same(ours, ref, 2e-5)
    exps = ours.entries["blk.0.ffn_down_exps.weight"]
    assert exps.sums.shape == (4, 64) and exps.counts.sum() == 6 * 64 * 2   # every token to 2 of 4 experts
    assert ours.entries["blk.0.ffn_gate_inp.weight"].counts.tolist() == [6 * 64]   # the router: a dense matrix
    assert ours.entries["output.weight"].counts.tolist() == [6 * 64]
    values = read_imatrix(tiny_moe["root"] / "llama.gguf")["blk.1.ffn_gate_exps.weight"]
    e = ref.entries["blk.1.ffn_gate_exps.weight"]
    assert values.shape == (4 * 64,)
    np.testing.assert_array_equal(values.reshape(4, 64), e.sums / e.counts.astype(np.float32)[:, None])


def test_batches_side_by_side_give_the_same_bytes(tiny_moe, monkeypatch, tmp_path):
    """Six chunks in batches of one or two chunks on two models side by side: the counts and sums of one batch (float64
    sums in another order: within 1e-6), and the same bytes on every run."""
    from releaser.imatrix import compute

    monkeypatch.setattr(compute, "PASS_TOKENS", 64)
    runs = [compute_imatrix(ImatrixOptions(chunks=6, ctx=64, process_output=True), tiny_moe["model"]).imatrix
            for _ in range(2)]
    assert_same(runs[0], tiny_moe["ours"], 1e-6)
    for k, r in enumerate(runs):
        write(r, tmp_path / f"{k}.gguf")
    assert (tmp_path / "0.gguf").read_bytes() == (tmp_path / "1.gguf").read_bytes()


def test_batches_as_tasks_give_the_in_process_bytes(tiny_moe, monkeypatch, tmp_path):
    """The executor's way (one task per batch, each writing its sums to a file, added in batch order by the caller;
    run here by run_local, on Ray in tests/test_ray.py): the bytes of the in-process run, experts and output.weight
    included, and no part file left."""
    from releaser.imatrix import compute
    from releaser.imatrix.stage import run
    from releaser.tasks import run_local

    monkeypatch.setattr(compute, "PASS_TOKENS", 128)   # 6 chunks of 64: three batches
    options = ImatrixOptions(chunks=6, ctx=64, process_output=True)
    calls = []

    def run_tasks(tasks):
        calls.append([(t.label, t.resources.cpus) for t in tasks])
        assert all(t.resources.memory > 0 for t in tasks)
        return run_local(tasks)

    run(options, tiny_moe["model"], tmp_path / "local", name="Tiny")
    run(options, tiny_moe["model"], tmp_path / "tasks", name="Tiny", run_tasks=run_tasks)
    assert calls == [[("chunks 1-2", 1), ("chunks 3-4", 1), ("chunks 5-6", 1)]]
    assert [p.name for p in (tmp_path / "tasks").iterdir()] == ["Tiny-imatrix.gguf"]
    made = [(tmp_path / d / "Tiny-imatrix.gguf").read_bytes() for d in ("local", "tasks")]
    assert made[0] == made[1]

    # a release's units folder: the batches a killed run finished are kept there and taken, not run again
    units, batch_sums = tmp_path / "units", compute.batch_sums
    ran = []

    def dies_at_the_third(*args, **kwargs):
        ran.append(args[2])
        if len(ran) == 3:
            raise KeyboardInterrupt
        return batch_sums(*args, **kwargs)

    monkeypatch.setattr(compute, "batch_sums", dies_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        run(options, tiny_moe["model"], tmp_path / "kept", name="Tiny", run_tasks=run_local, units=units)
    ran.clear()
    run(options, tiny_moe["model"], tmp_path / "kept", name="Tiny", run_tasks=run_local, units=units)
    assert ran == [str(units / "batch-00002" / "sums.npz")]   # only the batch the killed run did not finish
    assert (tmp_path / "kept" / "Tiny-imatrix.gguf").read_bytes() == made[0]


def test_a_batch_task_run_again_replaces_a_killed_runs_half_file(tiny_moe, tmp_path):
    """What a task killed mid-write leaves (its temporary file, a stale lock) is swept by the task run again, which
    writes the same sums."""
    import torch

    from releaser.imatrix.compute import batch_sums, load_sums

    tokens = torch.randint(3, 200, (2, 64), generator=torch.Generator().manual_seed(0))
    out = tmp_path / "batch-00000.npz"
    batch_sums(str(tiny_moe["model"]), tokens, str(out), True)
    first = out.read_bytes()
    out.unlink()
    (tmp_path / ".batch-00000.npz.releaser-tmp-dead").write_bytes(first[:100])   # a killed task's half file
    (tmp_path / ".batch-00000.npz.releaser-lock").write_text("1")                 # and its lock (nobody holds it)
    batch_sums(str(tiny_moe["model"]), tokens, str(out), True)
    assert out.read_bytes() == first and [p.name for p in tmp_path.iterdir()] == [out.name]
    sums, counts = load_sums(out)
    assert list(sums)[-1] == "output.weight" and counts["output.weight"].tolist() == [128]
    down = "blk.0.ffn_down_exps.weight"
    assert sums[down].dtype == torch.float64 and counts[down].sum() == 256   # 128 tokens, 2 experts each


def test_stage_writes_name_imatrix_gguf(tiny_moe, tmp_path):
    """The stage: NAME-imatrix.gguf in the output folder (other files kept), the calibration text's hash in the facts."""
    from releaser.imatrix.stage import run

    (tmp_path / "other.txt").write_text("kept")
    result = run(ImatrixOptions(chunks=3, ctx=64), tiny_moe["model"], tmp_path, name="Tiny")
    assert [f.path for f in result.files] == ["Tiny-imatrix.gguf"] and (tmp_path / "other.txt").is_file()
    written = read(tmp_path / "Tiny-imatrix.gguf")
    assert written.sha256 == [result.facts["dataset_sha256"]] and result.facts["chunks"] == 3
    assert result.facts["dataset"] == BUILTIN_NAME and result.facts["entries"] == len(written.entries)
    with pytest.raises(OutputError, match="already exists"):
        run(ImatrixOptions(chunks=3, ctx=64), tiny_moe["model"], tmp_path, name="Tiny")


def test_moe_forward_is_unchanged_by_collecting(tiny_moe):
    """The collecting experts forward computes what transformers' own does."""
    import torch
    from transformers import AutoModelForCausalLM

    from releaser.arch import architecture_for
    from releaser.imatrix.compute import _instrument, _Sums

    model = AutoModelForCausalLM.from_pretrained(tiny_moe["model"], dtype=torch.float32).eval()
    ids = torch.randint(0, 49152, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        config = model.config.to_dict()
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        _instrument(model, architecture_for(config), config, shapes, _Sums(), False, True)
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- bad input


def test_another_models_imatrix_is_one_line(smollm2_run, tiny_moe, tmp_path):
    smol = read(smollm2_run["llama"])
    tensors = {n: (e.cols, e.counts.size) for n, e in tiny_moe["ours"].entries.items()}
    with pytest.raises(ModelError, match="blk.0.attn_k.weight has 576 values but the tensor in the model takes 64") \
            as e:
        check_model(smol, tensors)
    assert "\n" not in str(e.value)
    with pytest.raises(ModelError, match="attn_output.weight, which the model does not have: it was computed for "
                       "another model"):
        check_model(smol, {"blk.0.attn_k.weight": (576, 1)})
    with pytest.raises(ModelError, match="imatrices of different models cannot be merged"):
        merge([smol, tiny_moe["ours"]])
    check_model(smol, {n: (e.cols, e.counts.size) for n, e in smol.entries.items()})   # its own model: fine


def test_truncated_and_foreign_files_are_one_line(smollm2_run, tmp_path, llama_tools):
    data = smollm2_run["llama"].read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="truncated or damaged"):
        read(tmp_path / "cut.gguf")
    llama_imatrix(llama_tools, "-m", smollm2_run["gguf"], "--in-file", smollm2_run["llama"], "--output-format", "dat", "-o", tmp_path / "x.dat")
    dat = (tmp_path / "x.dat").read_bytes()
    (tmp_path / "cut.dat").write_bytes(dat[: len(dat) // 2])
    with pytest.raises(ModelError, match="truncated"):
        read(tmp_path / "cut.dat")
    (tmp_path / "noise.bin").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ModelError, match="neither a GGUF imatrix nor a legacy .dat imatrix"):
        read(tmp_path / "noise.bin")
    with pytest.raises(ModelError, match="not an imatrix \\(a llama model\\)"):
        read(smollm2_run["gguf"])
    with pytest.raises(ModelError, match="does not exist"):
        read(tmp_path / "missing.gguf")


def test_cli_one_line_errors_and_merge(smollm2_run, tmp_path):
    from typer.testing import CliRunner

    from releaser.cli import app

    data = smollm2_run["llama"].read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:1000])
    r = CliRunner().invoke(app, ["imatrix-merge", str(smollm2_run["llama"]), str(tmp_path / "cut.gguf"), "-o",
                                 str(tmp_path / "m.gguf")])
    assert r.exit_code == 2 and "truncated or damaged" in r.output and len(r.output.strip().splitlines()) <= 2
    r = CliRunner().invoke(app, ["imatrix-merge", str(smollm2_run["llama"]), str(smollm2_run["ours"]), "-o",
                                 str(tmp_path / "m.gguf")])
    assert r.exit_code == 0, r.output
    assert read(tmp_path / "m.gguf").chunk_count == 2 * CHUNKS
    r = CliRunner().invoke(app, ["imatrix", str(smollm2_run["root"]), "-o", str(tmp_path / "x.gguf")])
    assert r.exit_code != 0 and "error" in r.output


def test_calibration_text_errors_and_formats(smollm2, tmp_path):
    tok = load_tokenizer(smollm2)
    (tmp_path / "short.txt").write_text("too short\n")
    with pytest.raises(ConfigError, match="needs at least 1024"):
        compute_imatrix(ImatrixOptions(text=str(tmp_path / "short.txt")), smollm2)
    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "robot", "content": "x"}]}\n')
    with pytest.raises(ConfigError, match="line 1: each message needs a role"):
        load_calibration(str(tmp_path / "bad.jsonl"), tok)
    with pytest.raises(ConfigError, match="does not exist"):
        load_calibration(str(tmp_path / "nope.txt"), tok)
    (tmp_path / "plain.txt").write_text("<|im_start|>hello\n")
    plain = load_calibration(str(tmp_path / "plain.txt"), tok)
    assert plain.text == "<|im_start|>hello" and not plain.parse_special and plain.conversations == 0
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"text": "a plain paragraph"}\n{"messages": [{"role": "user", "content": "hi"}, '
                     '{"role": "assistant", "content": "hello"}]}\n')
    calib = load_calibration(str(mixed), tok)
    assert calib.conversations == 1 and calib.parse_special and calib.text.startswith("a plain paragraph\n\n")


def test_builtin_calibration_is_not_the_evaluation_text():
    """The shipped conversations never contain the quality stage's evaluation text (nor the AWQ held-out text)."""
    import json
    from pathlib import Path

    import releaser

    pkg = Path(releaser.__file__).parent
    convs = (pkg / "imatrix" / "data" / "chat_calibration.jsonl").read_text(encoding="utf-8")
    content = " ".join(m["content"] for line in convs.splitlines() for m in json.loads(line)["messages"])
    for held_out in (pkg / "quality" / "data" / "origin_of_species.txt",):   # the evaluation text
        text = held_out.read_text(encoding="utf-8")
        sentences = [s.strip() for s in text.replace("\n", " ").split(".") if len(s.strip()) > 40]
        assert not [s for s in sentences if s in content], held_out.name


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3", "gemma2", "phi3", "olmo2", "smollm3", "qwen3moe"])
def test_every_family_covers_the_gguf_block_matrices(family, smollm2, tmp_path):
    """For every family: one entry per 2-D (3-D: per expert) block tensor of the model's GGUF, with its width, under
    the GGUF name (Phi-3's fused attn_qkv / ffn_up, Qwen3-MoE's ffn_*_exps and router); check_model accepts it."""
    from releaser.checkpoint import CheckpointReader
    from releaser.gguf.convert import Converter
    from releaser_testing import tiny_family_model, tiny_model

    model = tmp_path / family
    if family == "llama":
        tiny_model(model, vocab=49152)
    else:
        tiny_family_model(model, family)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(smollm2 / f, model / f)
    result = compute_imatrix(ImatrixOptions(chunks=2, ctx=32), model)
    with CheckpointReader(model) as reader:
        plan = Converter(reader).plan
    blocks = {p.name: ((p.shape[-1], p.shape[0]) if len(p.shape) == 3 else (p.shape[-1], 1))
              for p in plan if p.name.startswith("blk.") and len(p.shape) >= 2}
    got = {n: (e.cols, e.counts.size) for n, e in result.imatrix.entries.items()}
    assert got == blocks
    check_model(result.imatrix, blocks)
    assert all(int(e.counts.sum()) > 0 for e in result.imatrix.entries.values())
