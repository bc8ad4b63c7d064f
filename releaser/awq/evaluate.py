"""``releaser awq-eval``: perplexity of the unquantized model, of the AWQ checkpoint and of plain round-to-nearest
(same bits and group size) on held-out text, and the KL divergence of AWQ's next-token distribution from the
unquantized model's. The AWQ checkpoint is read by dequantizing its GEMM tensors into the unquantized model's layout."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import torch

from ..atomic import write_file
from ..checkpoint import CheckpointReader, architecture_for
from ..checkpoint.config import check_same_model
from ..errors import ModelError
from ..stage import Reporter
from .calib import heldout_rows
from .pack import dequantize
from .quantize import quantize
from .run import FUSED_LINEARS, LINEARS, resolve_device, use_all_cores
from .stage import CALIBRATION_FILE, load_tokenizer


SAME_MODEL = "evaluate the AWQ folder against the model it was made from"


def check_pair(model_dir: Path, awq_dir: Path) -> None:
    """Refuse, before loading anything, an unquantized folder that is quantized (the arguments swapped) or an AWQ
    folder whose config.json describes another model (architecture or sizes)."""
    with CheckpointReader(model_dir) as model, CheckpointReader(awq_dir) as awq:
        config, awq_config = model.config, awq.config
    if isinstance(config.get("quantization_config"), dict):
        raise ModelError(f"{model_dir} is quantized; give the unquantized model folder first, then the AWQ folder")
    awq_quantization(awq_config, awq_dir)
    check_same_model(config, awq_config, str(model_dir), str(awq_dir), SAME_MODEL)
    arch = architecture_for(config, str(model_dir))
    if arch.experts is not None:   # its RTN baseline and state loading know dense linears only
        raise ModelError(f"awq-eval does not handle {arch.label} (mixture of experts) yet; measure its AWQ folder with "
                         "releaser quality, which does")


def awq_quantization(config: dict, folder: Path) -> dict:
    """The quantization_config of a 4-bit GEMM AWQ folder's config.json; anything else is refused."""
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or str(qc.get("quant_method", "")).lower() != "awq":
        raise ModelError(f"{folder} is not an AWQ checkpoint (config.json has no quantization_config with "
                         "quant_method awq)")
    if str(qc.get("version", "gemm")).lower() != "gemm" or str(qc.get("bits", 4)) != "4":
        raise ModelError(f"{folder}: only 4-bit GEMM AWQ checkpoints can be evaluated")
    gs = qc.get("group_size")
    if isinstance(gs, bool) or not isinstance(gs, int) or gs <= 0:
        raise ModelError(f"{folder}/config.json: quantization_config.group_size is {gs!r}, not a positive whole "
                         "number; make the folder again with releaser awq")
    return qc


def awq_state(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(quantization_config, float32 state dict) of an AWQ GEMM folder: every quantized linear dequantized."""
    reader = CheckpointReader(folder)
    qc = awq_quantization(reader.config, folder)
    gs = int(qc["group_size"])
    state = {}
    for name in reader.tensors:
        if name.endswith(".qweight"):
            base = name.removesuffix(".qweight")
            state[base + ".weight"] = dequantize(reader.read(name), reader.read(base + ".qzeros"),
                                                 reader.read(base + ".scales"), gs)
        elif not name.endswith((".qzeros", ".scales")):
            state[name] = reader.read(name).float()
    return qc, state


def load_model(model_dir: Path, device: torch.device):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True,
                                                     trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a broken folder
        raise ModelError(f"cannot load {model_dir} with transformers ({type(exc).__name__}: {exc})") from exc
    return model.to(device).eval()


def load_awq_into(model, folder: Path) -> dict:
    qc, state = awq_state(folder)
    expected = set(model.state_dict())
    missing = expected - set(state) - {"lm_head.weight"}
    extra = set(state) - expected
    if missing or extra:
        name = sorted(missing or extra)[0]
        raise ModelError(f"{folder} does not match the unquantized model's layout ({'missing' if missing else 'extra'} "
                         f"tensor {name}); {SAME_MODEL}")
    shapes = model.state_dict()
    for name in sorted(state):
        if state[name].shape != shapes[name].shape:
            raise ModelError(f"{folder} does not match the unquantized model's layout ({name} is "
                             f"{tuple(state[name].shape)}, the model's {tuple(shapes[name].shape)}); {SAME_MODEL}")
    model.load_state_dict(state, strict=False)
    if "lm_head.weight" not in state and model.config.tie_word_embeddings:
        model.tie_weights()
    return qc


@torch.no_grad()
def round_to_nearest(model, group_size: int) -> None:
    """Quantize every decoder-block linear in place with plain group-wise RTN (no scaling, no clipping)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith((*LINEARS, *FUSED_LINEARS)):
            module.weight.copy_(quantize(module.weight.float(), group_size).dequantize().to(module.weight.dtype))


def _logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(model(ids).logits[:, :-1].float(), dim=-1)


def _nll(logp: torch.Tensor, ids: torch.Tensor) -> float:
    return float(-logp.gather(-1, ids[:, 1:].unsqueeze(-1)).sum())


@torch.no_grad()
def evaluate_awq(model_dir: str | os.PathLike, awq_dir: str | os.PathLike, reporter: Reporter | None = None, *,
                 text: str | os.PathLike | None = None, seqlen: int = 512, rows: int = 16, device: str = "auto",
                 write: bool = True) -> dict:
    """Perplexities (unquantized, AWQ, RTN) and KL(unquantized || AWQ) on held-out text; written into the AWQ
    folder's awq_calibration.json under ``eval`` unless ``write`` is False."""
    reporter = reporter or Reporter()
    model_dir, awq_dir = Path(model_dir), Path(awq_dir)
    dev = resolve_device(device)
    check_pair(model_dir, awq_dir)
    use_all_cores()
    tokenizer = load_tokenizer(model_dir)
    name, ids = heldout_rows(tokenizer, seqlen, rows, text)
    ids = ids.to(dev)
    base = load_model(model_dir, dev)
    quant = copy.deepcopy(base)
    qc = load_awq_into(quant, awq_dir)
    gs = int(qc["group_size"])
    nll = {"unquantized": 0.0, "awq": 0.0, "rtn": 0.0}
    kl = agree = 0.0
    with reporter.progress("awq-eval", total=2 * ids.shape[0]) as advance:
        for i in range(ids.shape[0]):
            row = ids[i:i + 1]
            lp_base, lp_awq = _logprobs(base, row), _logprobs(quant, row)
            nll["unquantized"] += _nll(lp_base, row)
            nll["awq"] += _nll(lp_awq, row)
            kl += float((lp_base.exp() * (lp_base - lp_awq)).sum())
            agree += float((lp_base.argmax(-1) == lp_awq.argmax(-1)).sum())
            advance()
        del quant
        round_to_nearest(base, gs)
        for i in range(ids.shape[0]):
            row = ids[i:i + 1]
            nll["rtn"] += _nll(_logprobs(base, row), row)
            advance()
    n = ids.shape[0] * (ids.shape[1] - 1)
    result = {"text": name, "rows": int(ids.shape[0]), "seq_len": int(ids.shape[1]), "tokens": n,
              "group_size": gs, "bits": int(qc.get("bits", 4)),
              "perplexity": {k: round(math.exp(v / n), 4) for k, v in nll.items()},
              "kl_awq": round(kl / n, 6), "top1_agreement_awq": round(agree / n, 4)}
    path = awq_dir / CALIBRATION_FILE
    if write and path.is_file():
        data = json.loads(path.read_text())
        data["eval"] = result
        write_file(path, json.dumps(data, indent=2) + "\n")
    elif write:
        reporter.warning(f"{awq_dir} has no {CALIBRATION_FILE} (not written by releaser awq); results not saved")
    ppl = result["perplexity"]
    reporter.message(f"perplexity on {result['tokens']} held-out tokens: unquantized {ppl['unquantized']:.3f}, "
                     f"AWQ {ppl['awq']:.3f}, RTN {ppl['rtn']:.3f}; KL(unquantized||AWQ) {result['kl_awq']:.4f}")
    return result
