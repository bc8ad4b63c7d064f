"""Architecture families beyond Llama/Mistral/Qwen2 (releaser/arch), each a tiny random model made by transformers'
own config class (random norm weights, SmolLM2's BPE tokenizer; Gemma 2: a SentencePiece model trained in the test),
against three oracles:

- GGUF: our F32 and Q8_0 files have the tensors (names, types, bytes) and architecture keys of llama.cpp's own
  ``convert_hf_to_gguf.py`` (the llama-cpp-python 0.3.36 sdist) followed by ``llama_model_quantize``, and, for a
  SentencePiece tokenizer.model, its tokenizer keys byte for byte;
- logits: llama.cpp on our F32 file gives transformers' float32 logits within 1e-3 relative;
- merge: a slerp with a gradient equals mergekit 0.1.5 tensor for tensor.

Expensive fixtures (models, llama.cpp conversions, one mergekit subprocess for all families) are built once."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from releaser.arch import architecture_for
from releaser.errors import ModelError
from releaser.gguf import export_gguf
from releaser.merge import run_merge
from releaser_testing import noised_variant, tiny_family_model

import gguf_oracle as o  # noqa: E402 - skips (outside CI) without llama-cpp-python
from conftest import require
from spm_fixture import train_gemma_spm
from test_parity import run_mergekit

pytestmark = pytest.mark.slow  # external oracles

FAMILIES = ["qwen3", "gemma3", "phi3", "gemma2", "olmo2", "smollm3", "qwen3moe"]
AWQ_FAMILIES = ["qwen3", "gemma3", "phi3", "gemma2", "olmo2", "smollm3", "qwen3moe"]
SPM_FAMILIES = ["gemma2"]   # a SentencePiece tokenizer.model (trained in the test) instead of SmolLM2's BPE tokenizer
QK_NORM_FAMILIES = {"qwen3", "gemma3", "olmo2", "qwen3moe"}
MOE_FAMILIES = ["qwen3moe"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
IDS = [1, 504, 3458, 282, 4649, 314, 8, 2]
SPM_TEXT = "And God said, Let there be light: and there was light. The origin of species, 1859."
# architecture keys releaser writes differently from convert_hf_to_gguf.py, with the reason
KEY_DIFFERENCES: dict[str, dict[str, str]] = {f: {} for f in FAMILIES} | {
    "gemma2": {"gemma2.rope.freq_base": "Gemma2Model.set_gguf_parameters does not write it (llama.cpp then uses "
                                        "10000, Gemma 2's value); we write config's rope_theta so another is kept"},
}
# chunks of 64 tokens the AWQ-vs-round-to-nearest KLD is measured on (default 2): OLMo 2 scales only two of its four
# groups, so its margin over RTN (6-25% at 8-16 chunks, tiny models of seeds 0-2) is below the noise of 2 chunks
QUALITY_CHUNKS = {"olmo2": 16}
# model shapes other than tiny_family_model's defaults: Phi-3 as Phi-3-mini has it, as many KV heads as heads (no
# GQA), so AWQ's qkv_proj -> o_proj group (o_proj's scales divide qkv_proj's v rows) is scaled; the GQA case, where
# it is not, is test_phi3_awq_folds_into_the_v_and_up_rows's
MODEL_SHAPES = {"phi3": dict(kv_heads=4)}
SLERP_T = [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"filter": "mlp", "value": [1, 0.3, 0]}, {"value": 0.5}]

def slerp_config(models: list[str]) -> dict:
    return {"merge_method": "slerp", "base_model": models[0], "dtype": "float32", "parameters": {"t": SLERP_T},
            "models": [{"model": m} for m in models]}


def ties_config(models: list[str]) -> dict:
    """TIES of the variant over the base, with a density gradient (sign election and magnitude pruning per tensor)."""
    return {"merge_method": "ties", "base_model": models[0], "dtype": "float32", "parameters": {"normalize": True},
            "models": [{"model": m, "parameters": {"weight": 1.0, "density": [0.3, 0.8]}} for m in models[1:]]}


def linear_config(models: list[str]) -> dict:
    return {"merge_method": "linear", "dtype": "float32",
            "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(models, [[0.2, 0.9, 0.5], 0.6])]}


EXPERT = re.compile(r"(?P<prefix>.+\.mlp\.experts)\.(?P<e>\d+)\.(?P<lin>gate|up|down)_proj\.weight$")


def uneven_experts(variant, base):
    """``variant`` with expert e moved (e + 1) / 2 times as far from ``base``: experts at different angles (a merge
    of the fused tensor and one expert by expert then differ clearly)."""
    from safetensors.torch import save_file

    v, b = load_file(variant / "model.safetensors"), load_file(base / "model.safetensors")
    for k in v:
        if m := EXPERT.match(k):
            v[k] = (b[k] + (int(m["e"]) + 1) / 2 * (v[k] - b[k])).contiguous()
    save_file(v, variant / "model.safetensors", metadata={"format": "pt"})
    return variant


def fused_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert tensors (released checkpoints; what releaser writes) in transformers 5's fused layout (what
    mergekit 0.1.5 writes): ``mlp.experts.gate_up_proj`` [E, 2 ff, hidden], gate rows first, ``down_proj``."""
    out, experts = {}, {}
    for k, v in state.items():
        m = EXPERT.match(k)
        if m:
            experts.setdefault(m["prefix"], {}).setdefault(m["lin"], {})[int(m["e"])] = v
        else:
            out[k] = v
    for prefix, lin in experts.items():
        stacked = {n: torch.stack([lin[n][e] for e in sorted(lin[n])]) for n in lin}
        out[prefix + ".gate_up_proj"] = torch.cat([stacked["gate"], stacked["up"]], dim=1)
        out[prefix + ".down_proj"] = stacked["down"]
    return out


@pytest.fixture(scope="session")
def families(tmp_path_factory, smollm2):
    """family -> paths: the model and a variant, our F32/Q8_0 export, llama.cpp's F32/Q8_0, mergekit's slerp."""
    root = tmp_path_factory.mktemp("families")
    out, jobs = {}, []
    for fam in FAMILIES:
        if fam in SPM_FAMILIES:   # Gemma's ids: <pad> 0, <eos> 1, <bos> 2
            vocab = train_gemma_spm(root / f"{fam}-tokenizer")
            model = tiny_family_model(root / fam, fam, seed=0, vocab=vocab, pad_token_id=0, eos_token_id=1,
                                      bos_token_id=2)
            for f in (root / f"{fam}-tokenizer").iterdir():
                shutil.copy(f, model / f.name)
        else:
            model = tiny_family_model(root / fam, fam, seed=0, **MODEL_SHAPES.get(fam, {}))
            for f in TOKENIZER_FILES:
                shutil.copy(smollm2 / f, model / f)
        if fam == "phi3":   # a Phi-4-style release: llama.cpp's Phi3MiniModel reads a GPT2Tokenizer as BPE (without
            #                 this class it insists on a SentencePiece tokenizer.model)
            tok_cfg = json.loads((model / "tokenizer_config.json").read_text())
            (model / "tokenizer_config.json").write_text(json.dumps(tok_cfg | {"tokenizer_class": "GPT2Tokenizer"}))
        variant = noised_variant(model, root / f"{fam}-v1", seed=1)
        # not "phi3": llama.cpp sets token attributes of Phi-3's own specials (</s>, ...) when general.name contains
        # "phi3" or "phi-3", and fails to load a file whose vocabulary (SmolLM2's here) lacks them
        ours = export_gguf(model, root / f"{fam}-ours", ["F32", "Q8_0"], name=fam.replace("phi3", "tiny-phi"))
        ref_f32 = o.convert_hf(model, root / f"{fam}-ref-F32.gguf", "f32")
        ref_q8 = root / f"{fam}-ref-Q8_0.gguf"
        o.quantize(ref_f32, ref_q8, "Q8_0")
        cfg = slerp_config([str(model), str(variant)])
        jobs.append((str(root / f"{fam}-mergekit"), cfg, None))
        ties = ties_config([str(model), str(variant)])
        if fam not in MOE_FAMILIES:   # mergekit prunes a fused [E, ...] experts tensor as one: see the MoE tests
            jobs.append((str(root / f"{fam}-mergekit-ties"), ties, None))
        out[fam] = {"model": model, "ours": {q: p[0] for q, p in ours.files.items()}, "ids": _ids(model, fam),
                    "ref": {"F32": ref_f32, "Q8_0": ref_q8}, "slerp": cfg, "mergekit": root / f"{fam}-mergekit",
                    "root": root, "variant": variant, "ties": ties}
        if fam in MOE_FAMILIES:   # three layers: the middle one's MLP gets t = 0.3, a real interpolation of experts
            deep = [tiny_family_model(root / f"{fam}-3l", fam, seed=0, layers=3)]
            deep.append(uneven_experts(noised_variant(deep[0], root / f"{fam}-3l-v1", seed=1), deep[0]))
            names = [str(m) for m in deep]
            out[fam]["deep"] = {"models": deep, "slerp": slerp_config(names), "linear": linear_config(names)}
            for kind in ("slerp", "linear"):
                jobs.append((str(root / f"{fam}-3l-mergekit-{kind}"), out[fam]["deep"][kind], None))
    run_mergekit(root, jobs)
    return out


def _ids(model, family: str) -> list[int]:
    """The logits test's prompt: SmolLM2 ids, or the trained SentencePiece tokenizer's ids of SPM_TEXT."""
    if family not in SPM_FAMILIES:
        return IDS
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model).encode(SPM_TEXT)
    assert ids[0] == 2 and len(ids) > 16, ids   # <bos>, and longer than the sliding window (8)
    return ids


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("quant", ["F32", "Q8_0"])
def test_gguf_equals_llama_cpp_converter(families, family, quant):
    f = families[family]
    ours, theirs = o.tensors(f["ours"][quant]), o.tensors(f["ref"][quant])
    assert {k: v[0] for k, v in ours.items()} == {k: v[0] for k, v in theirs.items()}
    assert [k for k in ours if ours[k][1] != theirs[k][1]] == []
    arch = architecture_for(json.loads((f["model"] / "config.json").read_text())).gguf_name
    mine, ref = o.keys(f["ours"][quant], arch + "."), o.keys(f["ref"][quant], arch + ".")
    differing = {k for k in mine.keys() | ref.keys() if mine.get(k) != ref.get(k)}
    assert differing == set(KEY_DIFFERENCES[family]), {k: (mine.get(k), ref.get(k)) for k in differing}
    assert o.keys(f["ours"][quant], "general.architecture") == {"general.architecture": arch}


def _tokenizer_fields(path) -> dict[str, bytes]:
    """The ``tokenizer.*`` keys of a GGUF file, each as its raw bytes (type, length and value)."""
    import gguf

    return {k: b"".join(bytes(p) for p in f.parts[1:]) for k, f in gguf.GGUFReader(path).fields.items()
            if k.startswith("tokenizer.")}


@pytest.mark.parametrize("family", SPM_FAMILIES)
def test_sentencepiece_vocab_equals_llama_cpp_converter(families, family):
    """With a SentencePiece tokenizer.model, every tokenizer key (tokens, scores, types, special ids, add_bos,
    add_space_prefix, chat template) is llama.cpp's converter's, byte for byte; llama.cpp tokenizes with it as
    transformers does."""
    from transformers import AutoTokenizer

    f = families[family]
    ours, ref = _tokenizer_fields(f["ours"]["F32"]), _tokenizer_fields(f["ref"]["F32"])
    assert sorted(ours) == sorted(ref)
    assert [k for k in ref if ours[k] != ref[k]] == []
    assert o.keys(f["ours"]["Q8_0"], "tokenizer.") == o.keys(f["ours"]["F32"], "tokenizer.")
    vocab = o.keys(f["ours"]["F32"], "tokenizer.")
    assert vocab["tokenizer.ggml.model"] == "llama" and vocab["tokenizer.ggml.add_space_prefix"] is False
    tokens, types = vocab["tokenizer.ggml.tokens"], vocab["tokenizer.ggml.token_type"]
    assert types[tokens.index("<mask>")] == 3 and types[tokens.index("<0x41>")] == 6   # CONTROL by its look; BYTE
    tok = AutoTokenizer.from_pretrained(f["model"])
    with o.load(f["ours"]["F32"], vocab_only=True) as m:
        for text in (SPM_TEXT, "<start_of_turn>user\nWhence  comes 42?<end_of_turn>\n"):
            assert o.tokenize(m, text, add_special=True) == tok.encode(text), text


def test_gemma2_refusals_are_one_line(families, tmp_path):
    """Gemma 2 without tokenizer.model, with a file that is not a SentencePiece model, or with a config llama.cpp
    would run differently (no softcapping, another query scale) is refused by the GGUF export in one line."""
    model = tmp_path / "gemma2"
    shutil.copytree(families["gemma2"]["model"], model)
    (model / "tokenizer.model").unlink()
    with pytest.raises(ModelError, match="has no tokenizer.model") as e:
        export_gguf(model, tmp_path / "out", ["F32"], name="g")
    messages = [str(e.value)]
    (model / "tokenizer.model").write_bytes((model / "tokenizer.json").read_bytes()[:4096])
    with pytest.raises(ModelError, match="is not a SentencePiece model") as e:
        export_gguf(model, tmp_path / "out", ["F32"], name="g")
    messages.append(str(e.value))
    shutil.copy(families["gemma2"]["model"] / "tokenizer.model", model / "tokenizer.model")
    config = json.loads((model / "config.json").read_text())
    for change, match in [({"final_logit_softcapping": None}, "no final_logit_softcapping"),
                          ({"query_pre_attn_scalar": 64}, "query_pre_attn_scalar 64")]:
        (model / "config.json").write_text(json.dumps(config | change))
        with pytest.raises(ModelError, match=match) as e:
            export_gguf(model, tmp_path / "out", ["F32"], name="g")
        messages.append(str(e.value))
    assert len(messages) == 4 and all("\n" not in m for m in messages)
    assert not (tmp_path / "out").exists()


def test_gemma2_tokenizer_sync_changes_nothing_for_the_same_folder(families, tmp_path):
    """The release's tokenizer-only path (rewrite a GGUF's tokenizer keys from the folder) on a SentencePiece vocab:
    the same folder changes nothing; a new chat template changes only that."""
    from releaser.gguf.fix import sync_tokenizer

    path = tmp_path / "g.gguf"
    shutil.copy(families["gemma2"]["ours"]["F32"], path)
    assert not sync_tokenizer(path, families["gemma2"]["model"]).changes
    model = tmp_path / "model"
    shutil.copytree(families["gemma2"]["model"], model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps(cfg | {"chat_template": "{{ messages }}"}))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    assert set(sync_tokenizer(path, model).changes) == {"tokenizer.chat_template"}


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_logits_match_transformers(families, family):
    from transformers import AutoModelForCausalLM

    f = families[family]
    with o.load(f["ours"]["F32"]) as m:
        ours = o.last_logits(m, f["ids"])
    model = AutoModelForCausalLM.from_pretrained(f["model"], dtype=torch.float32)
    with torch.no_grad():
        want = model(torch.tensor([f["ids"]])).logits[0, -1].numpy()
    assert float(np.abs(ours - want).max() / np.abs(want).max()) < 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_slerp_equals_mergekit(families, family):
    f = families[family]
    dest = f["root"] / f"{family}-ours-slerp"
    run_merge(f["slerp"], dest)
    got, want = load_file(dest / "model.safetensors"), load_file(f["mergekit"] / "model.safetensors")
    got, want = fused_experts(got), fused_experts(want)   # MoE: mergekit 0.1.5 writes transformers 5's fused experts
    assert set(got) == set(want)
    bad = [k for k, w in want.items()
           if got[k].shape != w.shape or not torch.allclose(got[k], w, rtol=0, atol=1e-6 * float(w.abs().max()))]
    assert bad == []
    cfg, mk_cfg = (json.loads((d / "config.json").read_text()) for d in (dest, f["mergekit"]))
    assert cfg["architectures"] == mk_cfg["architectures"]


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in MOE_FAMILIES])
def test_ties_equals_mergekit(families, family):
    f = families[family]
    dest = f["root"] / f"{family}-ours-ties"
    run_merge(f["ties"], dest)
    got, want = load_file(dest / "model.safetensors"), load_file(f["root"] / f"{family}-mergekit-ties" /
                                                                 "model.safetensors")
    assert set(got) == set(want)
    bad = [k for k, w in want.items()
           if got[k].shape != w.shape or not torch.allclose(got[k], w, rtol=0, atol=1e-6 * float(w.abs().max()))]
    assert bad == []


def test_stage_without_the_family_refuses_in_one_line(monkeypatch):
    import dataclasses

    import releaser.arch as registry

    monkeypatch.setattr(registry, "FAMILIES", [a if a.name != "qwen3" else dataclasses.replace(a, stages=("merge", "gguf"))
                                               for a in registry.FAMILIES])
    config = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}
    with pytest.raises(ModelError) as e:
        architecture_for(config, "m", stage="awq")
    msg = str(e.value)
    assert "\n" not in msg and "Qwen3" in msg and "LlamaForCausalLM" in msg and "is not supported by awq" in msg
    with pytest.raises(ModelError) as e:
        architecture_for({"architectures": ["GPT2LMHeadModel"]}, "m", stage="gguf")
    assert "GPT2LMHeadModel" in str(e.value) and "Qwen3ForCausalLM" in str(e.value)


def test_help_names_the_families_each_command_supports():
    from typer.testing import CliRunner

    from releaser.arch import FAMILIES
    from releaser.cli import app

    for command, stage in [("gguf", "gguf"), ("awq", "awq")]:
        text = " ".join(CliRunner().invoke(app, [command, "--help"], terminal_width=400).output.split())
        for arch in FAMILIES:
            assert (arch.label in text) == arch.supports(stage), (command, arch.label)


def test_doctor_names_the_family_and_its_stages(families):
    from typer.testing import CliRunner

    from releaser.cli import app

    text = " ".join(CliRunner().invoke(app, ["doctor", str(families["qwen3"]["model"])], terminal_width=400)
                    .output.split())
    assert "family Qwen3 (Qwen3ForCausalLM): merge, gguf, awq, quality (every stage)" in text


# ------------------------------------------------------------------------------------------------ AWQ and quality


@pytest.fixture(scope="session")
def families_awq(families):
    """family -> (AWQ folder of the tiny model, a round-to-nearest AWQ folder of it at the same group size)."""
    from releaser.awq import AWQOptions, run_awq
    from releaser_testing import rtn_awq

    out = {}
    for fam in AWQ_FAMILIES:
        f = families[fam]
        awq = f["root"] / f"{fam}-AWQ"
        result = run_awq(AWQOptions(samples=16, seqlen=64), f["model"], awq)
        out[fam] = (awq, rtn_awq(f["model"], f["root"] / f"{fam}-RTN-AWQ", group_size=result.facts["group_size"]))
    return out


@pytest.mark.parametrize("family", AWQ_FAMILIES)
def test_awq_blocks_run_as_transformers_does(families, family):
    """The AWQ block runner (layer-type RoPE, the sliding-window mask, Gemma's embedding scale) gives each decoder
    layer's output as transformers' whole model does, on rows longer than Gemma 3's sliding window."""
    from transformers import AutoModelForCausalLM

    from releaser.awq.run import BlockRunner, Settings, block_state, family_classes
    from releaser.checkpoint import CheckpointReader

    reader = CheckpointReader(families[family]["model"])
    arch = architecture_for(reader.config)
    classes = family_classes(reader.config, "tiny")
    ids = torch.randint(0, reader.config["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(0))
    model = AutoModelForCausalLM.from_pretrained(families[family]["model"], dtype=torch.float32)
    outputs = []
    hooks = [layer.register_forward_hook(lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
             for layer in model.model.layers]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    runner = BlockRunner(classes, Settings(64, torch.device("cpu"), torch.float32), 32, arch)
    hidden = reader.read(arch.embed)[ids].float() * (classes[3].hidden_size ** 0.5 if arch.embed_scale else 1.0)
    for i, want in enumerate(outputs):
        hidden = runner.forward(runner.build(block_state(reader, arch, i), i), hidden)
        assert torch.allclose(hidden, want, rtol=0, atol=1e-5 * float(want.abs().max())), (family, i)


@pytest.mark.parametrize("family", AWQ_FAMILIES)
def test_awq_layout_and_autoawq_unpacking(families, families_awq, family):
    """Every linear of the family's AWQ groups is a GEMM triple autoawq 0.2.9's unpacking reads back as ours; norms
    (QK-norm and Gemma's four per block included) stay float16 tensors."""
    from releaser.awq.pack import dequantize, unpack
    from releaser.checkpoint import CheckpointReader

    from releaser.awq.run import awq_linears, family_classes

    pu = require("awq.utils.packing_utils")   # autoawq 0.2.9: the oracle
    awq = CheckpointReader(families_awq[family][0])
    src = CheckpointReader(families[family]["model"])
    arch = architecture_for(src.config)
    linears = awq_linears(arch, family_classes(src.config, "tiny")[3])
    gs = awq.config["quantization_config"]["group_size"]
    for name in src.tensors:
        base = name.removesuffix(".weight")
        if arch.layer_of(name) is not None and base.split(".", 3)[3] in linears:
            qw, qz, sc = (awq.read(f"{base}.{t}") for t in ("qweight", "qzeros", "scales"))
            iw, iz = pu.reverse_awq_order(*pu.unpack_awq(qw, qz, 4), 4)
            assert torch.equal(torch.bitwise_and(iw, 15).to(torch.uint8), unpack(qw)), name
            assert torch.equal(pu.dequantize_gemm(qw, qz, sc, 4, gs), dequantize(qw, qz, sc, gs).t().half()), name
        else:
            kept = awq.tensors[name]
            assert str(kept.dtype) == "torch.float16" and kept.shape == src.tensors[name].shape, name
    assert any("q_norm" in n for n in src.tensors) == (family in QK_NORM_FAMILIES)
    if arch.experts is not None:   # every expert linear quantized, the router kept (float16, named not to convert)
        assert sum(n.endswith(".qweight") for n in awq.tensors) == 2 * (4 + 3 * 4)
        assert "mlp.gate" in awq.config["quantization_config"]["modules_to_not_convert"]


@pytest.mark.parametrize("family", AWQ_FAMILIES)
def test_quality_measures_gguf_and_awq(families, families_awq, family, tmp_path):
    """The quality stage on the family's GGUFs and AWQ folders: the F32 file read back (Gemma's +1 undone, Phi-3's
    fused qkv and gate_up as they are) is the model; llama.cpp running it agrees with our torch model (Gemma 3's final
    softcapping applied in both); Q8_0 is closer than 4-bit; AWQ is closer to the model than round-to-nearest (mean
    KLD). The quality stage's own round-to-nearest baseline (awq-eval's) rounds exactly the linears the test's
    round-to-nearest AWQ folder holds rounded, fused and stacked experts included."""
    from releaser.quality import QualityOptions, run_quality
    from releaser.quality.load import Artefact

    require("llama_cpp")
    f = families[family]
    awq, rtn = families_awq[family]
    gs = json.loads((rtn / "config.json").read_text())["quantization_config"]["group_size"]
    arts = [f["ours"]["F32"], f["ours"]["Q8_0"], awq, rtn, Artefact(f["model"], "rtn", "RTN", "baseline", gs)]
    options = QualityOptions(ctx=64, chunks=QUALITY_CHUNKS.get(family, 2), stop_test=False, gate=False)
    rows = {r["file"]: r for r in run_quality(options, f["model"], arts, tmp_path / "q.json").facts["artefacts"]}
    f32, q8, a, r = (rows[p.name] for p in arts[:4])
    assert f32["kld_mean"] < 1e-6 and f32["same_top"] == 1.0, f32
    assert 0 < q8["kld_mean"] < a["kld_mean"] < r["kld_mean"], (q8, a, r)
    assert rows["baseline"]["kld_mean"] == pytest.approx(r["kld_mean"], rel=1e-5, abs=1e-9), (rows["baseline"], r)
    # the cards of the family's GGUF and AWQ folders carry these measured figures
    from releaser.card import render_card

    gguf_card = render_card(f["ours"]["Q8_0"].parent, quality=tmp_path / "q.json")
    assert f"| {f['ours']['Q8_0'].name} | Q8_0 |" in gguf_card and f"{q8['ppl']:.3f}" in gguf_card, gguf_card
    awq_card = render_card(awq, quality=tmp_path / "q.json")
    assert f"PPL {a['ppl']:.3f}" in awq_card and architecture_for(
        json.loads((f["model"] / "config.json").read_text())).classes[0] in awq_card, awq_card
    cpp = run_quality(QualityOptions(ctx=64, chunks=2, stop_test=False, gate=False, backend="llama.cpp"),
                      f["model"], [f["ours"]["F32"]], tmp_path / "c.json").facts["artefacts"][0]
    assert cpp["backend"] == "llama.cpp" and cpp["kld_mean"] < 1e-4, cpp


@pytest.mark.parametrize("family", ["qwen3moe", "phi3"])
def test_awq_eval_on_experts_and_fused_linears(families, families_awq, family):
    """awq-eval (the quality stage on the AWQ folder and on round-to-nearest) measures a mixture of experts and fused
    linears: AWQ is closer to the model than round-to-nearest."""
    from releaser.awq.evaluate import evaluate_awq
    from releaser.quality import QualityOptions

    r = evaluate_awq(families[family]["model"], families_awq[family][0], options=QualityOptions(ctx=64, chunks=2),
                     write=False)
    assert 0 < r["kld_mean"]["awq"] < r["kld_mean"]["rtn"], r   # (random tiny models: their perplexities say little)


def test_phi3_awq_folds_into_the_v_and_up_rows(families):
    """Phi-3's fused linears as AutoAWQ 0.2.9 scales them: the norms' scales multiply qkv_proj's and gate_up_proj's
    input columns (``scale_ln_fcs``); o_proj's divide qkv_proj's last rows (v) and down_proj's gate_up_proj's last rows
    (up; ``scale_fc_fc``). Our folds equal autoawq's tensor for tensor and leave the block's output as it was; with
    grouped-query attention (Phi-4) the qkv_proj -> o_proj group is not scaled."""
    import copy

    from releaser.awq.run import BlockRunner, Settings, block_state, family_classes, family_groups, fold_group, \
        scaling_groups
    from releaser.checkpoint import CheckpointReader

    scale = require("awq.quantize.scale")
    reader = CheckpointReader(families["phi3"]["model"])
    arch = architecture_for(reader.config)
    classes = family_classes(reader.config, "tiny")
    runner = BlockRunner(classes, Settings(64, torch.device("cpu"), torch.float32), 16, arch)
    layer = runner.build(block_state(reader, arch, 0), 0)
    groups = scaling_groups(layer, family_groups(arch))
    assert [(g.prev, g.prev_rows) for g in groups] == [("input_layernorm", "all"), ("self_attn.qkv_proj", "last"),
                                                        ("post_attention_layernorm", "all"), ("mlp.gate_up_proj", "last")]
    hidden = torch.randn(2, 16, classes[3].hidden_size, generator=torch.Generator().manual_seed(0))
    want = runner.forward(layer, hidden)
    theirs = copy.deepcopy(layer)
    gen = torch.Generator().manual_seed(1)
    for g in groups:
        s = torch.rand(layer.get_submodule(g.linears[0]).in_features, generator=gen) + 0.5
        fold_group(layer, g, s)
        prev, fcs = theirs.get_submodule(g.prev), [theirs.get_submodule(n) for n in g.linears]
        with torch.no_grad():
            scale.scale_fc_fc(prev, fcs[0], s) if isinstance(prev, torch.nn.Linear) else scale.scale_ln_fcs(prev, fcs, s)
    ours, ref = layer.state_dict(), theirs.state_dict()
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
    assert not torch.equal(ours["self_attn.qkv_proj.weight"], block_state(reader, arch, 0)["self_attn.qkv_proj.weight"])
    got = runner.forward(layer, hidden)
    assert torch.allclose(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))
    gqa = classes[3].__class__(**(classes[3].to_dict() | {"num_key_value_heads": 2}))
    assert [g.prev for g in scaling_groups(classes[0](gqa, 0), family_groups(arch))] == \
        ["input_layernorm", "post_attention_layernorm", "mlp.gate_up_proj"]


def test_phi3_refusals_are_one_line(families, tmp_path):
    """A Phi-3 long-rope config (rope factor tensors) is refused by the GGUF export in one line."""
    config = json.loads((families["phi3"]["model"] / "config.json").read_text())
    model = tmp_path / "longrope"
    shutil.copytree(families["phi3"]["model"], model)
    factors = [1.0] * 8
    config["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0, "long_factor": factors,
                                 "short_factor": factors, "original_max_position_embeddings": 256}
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="RoPE type .longrope. .* not supported by the GGUF export") as e:
        export_gguf(model, tmp_path / "out", ["F32"], name="longrope")
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ OLMo 2 and SmolLM3


def test_olmo2_awq_scales_only_groups_with_a_source(families, families_awq):
    """OLMo 2 has no pre-norms: q/k/v and gate/up read the residual stream, so only v_proj -> o_proj and
    up_proj -> down_proj are scaled (their search ratios are recorded); q/k/v/gate/up are quantized all the same."""
    from releaser.awq.run import family_groups
    from releaser.checkpoint import CheckpointReader

    arch = architecture_for(json.loads((families["olmo2"]["model"] / "config.json").read_text()))
    assert [g.prev for g in family_groups(arch)] == [None, "self_attn.v_proj", None, "mlp.up_proj"]
    facts = json.loads((families_awq["olmo2"][0] / "awq_calibration.json").read_text())
    assert all(set(r) == {"self_attn.v_proj", "mlp.up_proj"} for r in facts["scale_ratios"]), facts["scale_ratios"]
    awq = CheckpointReader(families_awq["olmo2"][0])
    for linear in arch.awq_linears:
        assert f"model.layers.0.{linear}.qweight" in awq.tensors, linear
    assert "model.layers.0.self_attn.q_norm.weight" in awq.tensors


def test_olmo2_and_smollm3_gguf_refusals_are_one_line(families, tmp_path):
    """What llama.cpp would run wrong is refused before any file is written: OLMo 2 with tied embeddings (llama.cpp's
    olmo2 needs an output tensor); SmolLM3 whose NoPE layers are not llama.cpp's fixed every-4th pattern, or with a
    sliding window."""
    cases = [("olmo2", {"tie_word_embeddings": True}, "tied embeddings"),
             ("smollm3", {"no_rope_layers": [1, 0, 1, 0]}, "no_rope_layers"),
             ("smollm3", {"no_rope_layers": None, "no_rope_layer_interval": 2}, "no_rope_layers"),
             ("smollm3", {"use_sliding_window": True, "sliding_window": 8}, "use_sliding_window")]
    for i, (fam, change, words) in enumerate(cases):
        model = tmp_path / f"{fam}-{i}"
        shutil.copytree(families[fam]["model"], model)
        config = json.loads((model / "config.json").read_text()) | change
        (model / "config.json").write_text(json.dumps(config))
        with pytest.raises(ModelError, match=words) as e:
            export_gguf(model, tmp_path / f"out-{i}", ["F32"], name=fam)
        assert "\n" not in str(e.value) and not (tmp_path / f"out-{i}").exists()


def test_smollm3_nope_layer_matters(families):
    """The tiny SmolLM3 has a NoPE layer (layer 3): with RoPE there too, transformers' logits change by more than
    the 1e-3 the llama.cpp logits test allows, so that test would catch a file run with the wrong pattern."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = families["smollm3"]["model"]
    assert json.loads((path / "config.json").read_text())["no_rope_layers"] == [1, 1, 1, 0]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    all_rope = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, config=AutoConfig.from_pretrained(
        path, no_rope_layers=[1, 1, 1, 1]))
    with torch.no_grad():
        a, b = (m(torch.tensor([IDS])).logits[0, -1] for m in (model, all_rope))
    assert float((a - b).abs().max() / a.abs().max()) > 3e-3


# ------------------------------------------------------------------------------------------------ mixture of experts


def test_qwen3moe_linear_merge_equals_mergekit(families):
    """A linear merge (per-model weight gradient) of three-layer Qwen3-MoE models equals mergekit 0.1.5 on every tensor
    (mergekit merges transformers 5's fused experts, releaser each expert: the same for an elementwise method); the
    output keeps the per-expert layout of the inputs and loads in transformers."""
    from transformers import AutoModelForCausalLM

    d, root = families["qwen3moe"]["deep"], families["qwen3moe"]["root"]
    dest = root / "qwen3moe-3l-ours-linear"
    run_merge(d["linear"], dest)
    got = load_file(dest / "model.safetensors")
    assert set(got) == set(load_file(d["models"][0] / "model.safetensors"))   # per expert, as the inputs
    got, want = fused_experts(got), load_file(root / "qwen3moe-3l-mergekit-linear" / "model.safetensors")
    assert set(got) == set(want)
    bad = [k for k, w in want.items() if not torch.allclose(got[k], w, rtol=0, atol=1e-6 * float(w.abs().max()))]
    assert bad == []
    AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32)


def test_qwen3moe_slerp_merges_expert_by_expert(families):
    """Slerp of three-layer Qwen3-MoE models (the middle layer's MLP at t = 0.3): every expert's gate, up and down
    are slerped on their own (mergekit's own slerp function, per expert, is the oracle), the router and the other
    tensors equal mergekit 0.1.5. mergekit 0.1.5 slerps each layer's fused [E, 2 ff, hidden] tensor as one vector
    (one angle for all experts and gate+up together), which gives other experts: that difference is checked too."""
    slerp = require("mergekit.merge_methods.slerp").slerp
    d, root = families["qwen3moe"]["deep"], families["qwen3moe"]["root"]
    dest = root / "qwen3moe-3l-ours-slerp"
    run_merge(d["slerp"], dest)
    got = load_file(dest / "model.safetensors")
    a, b = (load_file(m / "model.safetensors") for m in d["models"])
    mk = load_file(root / "qwen3moe-3l-mergekit-slerp" / "model.safetensors")
    experts = [k for k in got if EXPERT.match(k)]
    assert len(experts) == 3 * 4 * 3
    for k in experts:
        t = [1.0, 0.3, 0.0][int(k.split(".")[2])]
        want = slerp(torch.tensor([t]), a[k][None], b[k][None])[0]   # a batch of one tensor, slerped whole
        assert torch.allclose(got[k], want, rtol=0, atol=1e-6 * float(want.abs().max())), k
    fused = fused_experts(got)
    others = [k for k in mk if "mlp.experts" not in k]
    assert any(k.endswith("mlp.gate.weight") for k in others)
    assert [k for k in others if not torch.allclose(fused[k], mk[k], rtol=0, atol=1e-6 * float(mk[k].abs().max()))] == []
    middle = "model.layers.1.mlp.experts.gate_up_proj"
    assert float((fused[middle] - mk[middle]).abs().max()) > 1e-4 * float(mk[middle].abs().max())   # ~2e-3 here


def test_qwen3moe_gguf_stacks_one_layer_of_one_linear_at_a_time(families):
    """Each ffn_*_exps tensor is built from that layer's experts of that linear only (bounded memory: never all
    experts of all layers), in expert order; the router (ffn_gate_inp) and norms stay F32 in Q8_0."""
    from releaser.checkpoint import CheckpointReader
    from releaser.gguf.convert import Converter

    f = families["qwen3moe"]
    with CheckpointReader(f["model"]) as reader:
        conv = Converter(reader)
        read, seen = reader.read, []
        reader.read = lambda name: (seen.append(name), read(name))[1]
        plan = next(p for p in conv.plan if p.name == "blk.1.ffn_up_exps.weight")
        data = conv.read(plan)
        assert seen == [f"model.layers.1.mlp.experts.{e}.up_proj.weight" for e in range(4)]
        assert data.shape == (4, 64, 64)
        assert np.array_equal(data[2], read("model.layers.1.mlp.experts.2.up_proj.weight").numpy())
    q8 = o.tensors(f["ours"]["Q8_0"])
    assert q8["blk.0.ffn_gate_inp.weight"][0] == 0 and q8["blk.0.ffn_norm.weight"][0] == 0      # F32
    assert q8["blk.0.ffn_down_exps.weight"][0] == 8                                             # Q8_0


def test_qwen3moe_quality_streams_gguf_experts(families, tmp_path):
    """The quality stage on Qwen3-MoE GGUFs: the F32 file read back (stacked experts -> transformers' fused ones,
    one layer at a time) is the model, Q8_0 is close but not equal; llama.cpp running the F32 file agrees with our
    streamed torch model of the folder (per-expert tensors fused layer by layer)."""
    from releaser.quality import QualityOptions, run_quality

    require("llama_cpp")
    f = families["qwen3moe"]
    arts = [f["ours"]["F32"], f["ours"]["Q8_0"]]
    rows = {r["file"]: r for r in run_quality(QualityOptions(ctx=64, chunks=2, stop_test=False, gate=False),
                                              f["model"], arts, tmp_path / "q.json").facts["artefacts"]}
    f32, q8 = (rows[p.name] for p in arts)
    assert f32["kld_mean"] < 1e-6 and f32["same_top"] == 1.0, f32
    assert 0 < q8["kld_mean"] < 1e-2, q8
    cpp = run_quality(QualityOptions(ctx=64, chunks=2, stop_test=False, gate=False, backend="llama.cpp"),
                      f["model"], [f["ours"]["F32"]], tmp_path / "c.json").facts["artefacts"][0]
    assert cpp["backend"] == "llama.cpp" and cpp["kld_mean"] < 1e-4, cpp


def test_qwen3moe_streamed_model_equals_transformers(families):
    """The streamed model (one decoder layer's weights in memory at a time) of the Qwen3-MoE folder gives
    transformers' logits."""
    from transformers import AutoModelForCausalLM

    from releaser.quality.load import open_weights, streamed

    f = families["qwen3moe"]
    ids = torch.tensor([IDS])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(f["model"], dtype=torch.float32)(ids).logits
    with open_weights(f["model"]) as w, torch.no_grad():
        model = streamed(w)
        got = model.lm_head(model.model(ids).last_hidden_state)
    assert torch.allclose(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_qwen3moe_refusals_are_one_line(families, tmp_path):
    """The GGUF export refuses what llama.cpp's qwen3moe would compute differently (no top-k renormalization, dense
    layers) and a config.json whose expert count the weights contradict; AWQ refuses dense layers and fused experts."""
    from releaser.awq import AWQOptions, run_awq

    model = families["qwen3moe"]["model"]
    config = json.loads((model / "config.json").read_text())
    dense = tmp_path / "dense"
    shutil.copytree(model, dense)
    (dense / "config.json").write_text(json.dumps(config | {"mlp_only_layers": [1]}))
    with pytest.raises(ModelError, match="dense layers .* not supported by awq") as e:
        run_awq(AWQOptions(samples=4, seqlen=32), dense, tmp_path / "dense-awq")
    assert "\n" not in str(e.value)
    fused = tmp_path / "fused"
    shutil.copytree(model, fused)
    state = fused_experts(load_file(model / "model.safetensors"))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, fused / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match="stores its experts fused") as e:
        run_awq(AWQOptions(samples=4, seqlen=32), fused, tmp_path / "fused-awq")
    assert "\n" not in str(e.value)
    for change, match in [({"norm_topk_prob": False}, "norm_topk_prob false"),
                          ({"mlp_only_layers": [1]}, "dense layers"),
                          ({"num_local_experts": 8}, "num_local_experts 8 but layer 0 holds 4 experts")]:
        bad = tmp_path / f"bad-{len(change)}-{next(iter(change))}"
        shutil.copytree(model, bad)
        (bad / "config.json").write_text(json.dumps(config | change))
        with pytest.raises(ModelError, match=match) as e:
            export_gguf(bad, tmp_path / f"out-{bad.name}", ["F32"], name="bad")
        assert "\n" not in str(e.value)


def test_qwen3moe_fused_experts_export_as_per_expert_ones(families, tmp_path):
    """A folder with transformers 5's fused experts (mergekit 0.1.5's output layout) gives the same GGUF as the
    per-expert folder: gate and up split from gate_up_proj, one layer at a time."""
    from safetensors.torch import save_file

    f = families["qwen3moe"]
    fused = tmp_path / "fused"
    shutil.copytree(f["model"], fused)
    state = fused_experts(load_file(f["model"] / "model.safetensors"))
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file({k: v.contiguous() for k, v in state.items()}, fused / "model.safetensors", metadata={"format": "pt"})
    ours = export_gguf(fused, tmp_path / "out", ["F32"], name="qwen3moe").files["F32"][0]
    assert o.tensors(ours) == o.tensors(f["ours"]["F32"])


def test_qwen3moe_awq_scales_fold_into_the_router_too():
    """AWQ's MLP scales divide post_attention_layernorm, which the router reads as well as the experts: folded into
    the router's columns too (kept unquantized), the block computes the same function (same experts chosen); left
    out of the router, the routing would change."""
    from releaser.awq.run import BlockRunner, Settings, block_state, family_classes, fold_group
    from releaser.checkpoint import CheckpointReader

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        model = tiny_family_model(Path(tmp) / "m", "qwen3moe", seed=3, layers=1, vocab=256)
        reader = CheckpointReader(model)
        arch = architecture_for(reader.config)
        runner = BlockRunner(family_classes(reader.config, "tiny"), Settings(64, torch.device("cpu"), torch.float32),
                             16, arch)
        layer = runner.build(block_state(reader, arch, 0), 0)
        x = torch.randn(4, 16, 64, generator=torch.Generator().manual_seed(0))
        want = runner.forward(layer, x)
        group = next(g for g in runner.groups if g.scaled)
        assert group.scaled == ("mlp.gate",) and len(group.linears) == 8
        s = torch.rand(64, generator=torch.Generator().manual_seed(1)) * 4 + 0.25
        fold_group(layer, group, s)
        got = runner.forward(layer, x)
        assert torch.allclose(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_qwen3moe_fused_inputs_merge_expert_by_expert(families, tmp_path):
    """Models with transformers 5's fused experts (mergekit 0.1.5's output) merge expert by expert too: the slerp of
    the fused copies is the slerp of the per-expert models, fused; the output keeps the fused layout."""
    from safetensors.torch import save_file

    d = families["qwen3moe"]["deep"]
    copies = []
    for i, m in enumerate(d["models"]):
        c = tmp_path / f"fused-{i}"
        shutil.copytree(m, c)
        save_file({k: v.contiguous() for k, v in fused_experts(load_file(m / "model.safetensors")).items()},
                  c / "model.safetensors", metadata={"format": "pt"})
        copies.append(str(c))
    run_merge(slerp_config(copies), tmp_path / "out")
    got = load_file(tmp_path / "out" / "model.safetensors")
    per_expert = tmp_path / "per-expert"
    run_merge(d["slerp"], per_expert)
    want = fused_experts(load_file(per_expert / "model.safetensors"))
    assert set(got) == set(want) and "model.layers.1.mlp.experts.gate_up_proj" in got
    assert [k for k, w in want.items() if not torch.allclose(got[k], w, rtol=0, atol=1e-6 * float(w.abs().max()))] == []


def test_qwen3moe_8_expert_k_quant_mixes_equal_llama_cpp(smollm2, tmp_path):
    """llama.cpp gives 8-expert models more bits in attention (attn_v and attn_k Q8_0, attn_output Q5_K): our Q4_K_M
    and Q2_K files of an 8-expert Qwen3-MoE have llama_model_quantize's tensor types and bytes."""
    model = tiny_family_model(tmp_path / "moe8", "qwen3moe", seed=0, hidden=256, heads=4, kv_heads=2, num_experts=8,
                              moe_intermediate_size=256, head_dim=64)
    for f in TOKENIZER_FILES:
        shutil.copy(smollm2 / f, model / f)
    ours = export_gguf(model, tmp_path / "ours", ["Q4_K_M", "Q2_K"], name="moe8").files
    ref_f32 = o.convert_hf(model, tmp_path / "ref-F32.gguf", "f32")
    for quant in ("Q4_K_M", "Q2_K"):
        ref = tmp_path / f"ref-{quant}.gguf"
        o.quantize(ref_f32, ref, quant)
        mine, theirs = o.tensors(ours[quant][0]), o.tensors(ref)
        assert {k: v[0] for k, v in mine.items()} == {k: v[0] for k, v in theirs.items()}, quant
        assert mine["blk.0.attn_k.weight"][0] == 8 and mine["blk.0.attn_output.weight"][0] == 13, quant  # Q8_0, Q5_K
        assert [k for k in mine if mine[k][1] != theirs[k][1]] == [], quant
