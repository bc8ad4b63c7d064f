"""The quality gate: a quant whose mean KL divergence from the unquantized model is far above what its type gives (a
broken conversion, a zeroed tensor, a wrong tokenizer) stops the release, and so does a Q4 artefact that does not end
a chat turn with the end-of-turn token (the stop test on the quantized weights)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ReleaserError

# Mean-KLD limits per quant type: several times what the type gives on a small model (SmolLM2-135M, where quantization
# hurts more than on 7B+ models: F16 ~1e-5, Q8_0 ~4e-4, Q4_K_M ~0.03 on the built-in text), and well below what a
# broken file gives (one zeroed tensor or a shifted vocabulary: 0.5 to 10). Override per type with ``max_kld``.
DEFAULT_MAX_KLD = {
    "F32": 0.005, "F16": 0.005, "BF16": 0.01,
    "Q8_0": 0.02,
    "Q6_K": 0.05,
    "Q5_K_M": 0.1, "Q5_K_S": 0.1, "Q5_1": 0.1, "Q5_0": 0.1,
    "Q4_K_M": 0.2, "Q4_K_S": 0.25, "Q4_1": 0.3, "Q4_0": 0.3, "AWQ": 0.3, "W4A16": 0.3,
    "MLX-4bit": 0.5,   # SmolLM2: 0.145 from the AWQ codes, 0.30 rounded by MLX (head 8-bit), 0.42 with mlx-lm's 4-bit head
    "MLX-8bit": 0.02,
    "IQ4_XS": 0.6, "IQ4_NL": 0.6,   # SmolLM2: 0.19 without an imatrix (its 576-wide rows take IQ4_NL), 0.09 with one
    "Q3_K_L": 0.5, "Q3_K_M": 0.6, "Q3_K_S": 0.8,
    "Q2_K": 1.5,
    # SmolLM2 without an imatrix: IQ3_S 0.75 (Q3_K_S 0.38, same size), IQ3_M 0.63; with one: 0.14, 0.12 (IQ3_XS as IQ3_S:
    # its IQ3_XXS tensors are 576 wide and fall back to IQ4_NL)
    "IQ3_M": 1.5, "IQ3_S": 1.5, "IQ3_XS": 1.0,
    # SmolLM2 with its imatrix (they need one; its 576-wide rows take IQ4_NL, so only ffn_down is 2-bit): IQ3_XXS 0.19,
    # IQ2_M 0.29, IQ2_S 0.38, IQ2_XS 0.46, IQ2_XXS 0.58 (Q2_K with the same imatrix 0.25)
    "IQ3_XXS": 1.0, "IQ2_M": 1.5, "IQ2_S": 1.5, "IQ2_XS": 1.5, "IQ2_XXS": 1.5,
    # SmolLM2 with an imatrix (its 576-wide rows take IQ4_NL, so only ffn_down is 1-bit): IQ1_S 1.07, IQ1_M 0.87 (Q2_K
    # with the same imatrix 0.25)
    "IQ1_S": 2.0, "IQ1_M": 1.75,
}
FALLBACK_MAX_KLD = 1.5   # types without a limit of their own (lower I-quants, ternary): only a broken file trips it

# The artefact the stop test runs on: the first of these types present, else the AWQ folder, else the smallest file
STOP_TEST_TYPES = ["Q4_K_M", "Q4_K_S", "Q4_0", "Q4_1", "Q5_K_M", "Q5_K_S", "Q6_K", "Q8_0"]
STOP_PROMPT = "What is 2 + 2?"


class QualityGateError(ReleaserError):
    """A quantized artefact fails the quality gate (the message names the file and the figure)."""


def max_kld(quant: str, overrides: dict[str, float] | None = None) -> float:
    overrides = overrides or {}
    return overrides.get(quant, DEFAULT_MAX_KLD.get(quant, FALLBACK_MAX_KLD))


@dataclass(frozen=True)
class StopResult:
    passed: bool
    text: str                 # what the model generated
    tokens: int               # generated tokens
    end_token: str | None     # the end-of-turn token it ended with (None: it did not stop)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "text": self.text, "tokens": self.tokens, "end_token": self.end_token}


STOP_MAX_NEW = 256   # tokens the stop test lets a model generate before it counts as not stopping


def stop_verdict(quantized: StopResult, unquantized: StopResult | None) -> dict:
    """The stop test's outcome for the report. The quantized artefact must end its turn; when the unquantized model
    does not end it within the same budget either, the prompt says nothing about quantization (a rambling model, not
    a broken file) and the test is inconclusive rather than failed."""
    conclusive = unquantized is None or unquantized.passed
    return {**quantized.to_dict(), "passed": quantized.passed or not conclusive, "conclusive": conclusive,
            "unquantized": unquantized.to_dict() if unquantized else None}


def stop_test(model, tokenizer, chat_template: str, end_ids: list[int], max_new: int = STOP_MAX_NEW) -> StopResult:
    """Greedy generation from ``model`` for a one-question chat rendered with ``chat_template``: passes when it ends
    with one of ``end_ids`` within ``max_new`` tokens."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": STOP_PROMPT}], chat_template=chat_template,
                                           add_generation_prompt=True, tokenize=False)
    import torch
    from transformers import GenerationConfig

    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    config = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=list(end_ids),
                              pad_token_id=end_ids[0])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)[0, ids.shape[1]:]
    out = out.tolist()
    ended = bool(out) and out[-1] in end_ids
    return StopResult(ended, tokenizer.decode(out), len(out),
                      tokenizer.convert_ids_to_tokens(out[-1]) if ended else None)
