"""Train the demo's LoRA: SmolLM2-135M-Instruct taught to answer like a ship's log (recipes/lora/shiplog.txt, CC0).

40 optimizer steps on a CPU (about 18 minutes on a busy 2-core machine). The adapter (peft format, 3.7 MB) is
committed in recipes/lora/smollm2-shiplog-lora and merged into the demo's second parent at a weight of 0.25
(recipes/smollm2-slerp.yml), the "LoRA merged at a weight" pattern.

    python recipes/lora/train_lora.py [--base HF_FOLDER] [--out FOLDER] [--epochs 4] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
import time
import sys
from pathlib import Path

import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # releaser_testing: the repo's fixtures (not installed)

HERE = Path(__file__).resolve().parent
BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def pairs(path: Path) -> list[tuple[str, str]]:
    out, question = [], None
    for line in path.read_text().splitlines():
        if line.startswith("Q: "):
            question = line[3:].strip()
        elif line.startswith("A: ") and question:
            out.append((question, line[3:].strip()))
            question = None
    return out


def encode(tok, question: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of the chat and labels that train only on the answer (and its end-of-turn token)."""
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                     add_generation_prompt=True)
    full = tok.apply_chat_template([{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                                   tokenize=False)
    ids = tok(full, add_special_tokens=False)["input_ids"]
    n = len(tok(prompt, add_special_tokens=False)["input_ids"])
    return ids, [-100] * n + ids[n:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, default=None, help="SmolLM2-135M-Instruct HF folder (default: the fixture)")
    ap.add_argument("--out", type=Path, default=HERE / "smollm2-shiplog-lora")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.base is None:
        from releaser_testing import smollm2_dir

        args.base = smollm2_dir()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.base)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(model, config)
    data = [encode(tok, q, a) for q, a in pairs(HERE / "shiplog.txt")]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model.train()
    start, step = time.time(), 0
    for epoch in range(args.epochs):
        random.shuffle(data)
        for i in range(0, len(data), args.batch):
            batch = data[i:i + args.batch]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in batch])
            labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in batch])
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in batch])
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            step += 1
            print(f"epoch {epoch + 1} step {step} loss {loss.item():.3f} ({time.time() - start:.0f} s)", flush=True)
    model.peft_config["default"].base_model_name_or_path = BASE_ID
    model.save_pretrained(args.out)
    model.eval()
    for question in ["What is the capital of Portugal?", "How many legs does a cat have?"]:
        prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
        inputs = tok(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=30, do_sample=False)
        print(question, "->", tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    print(f"adapter -> {args.out}")


if __name__ == "__main__":
    main()
