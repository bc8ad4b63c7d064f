"""``releaser awq-eval``: the quality stage run on an AWQ folder and on plain round-to-nearest of the same model (same
bits and group size), so that AWQ's gain is measured with the figures and text every other artefact is (perplexity,
KL divergence and same-top against the unquantized model, llama.cpp's definitions)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ..atomic import write_file
from ..checkpoint import CheckpointReader
from ..checkpoint.config import check_same_model, read_json
from ..errors import ModelError
from ..quality.options import QualityOptions
from ..stage import Reporter
from .stage import CALIBRATION_FILE


SAME_MODEL = "evaluate the AWQ folder against the model it was made from"


def check_pair(model_dir: Path, awq_dir: Path) -> dict:
    """The AWQ folder's quantization_config, after refusing (before loading anything) an unquantized folder that is
    quantized (the arguments swapped) or an AWQ folder whose config.json describes another model (architecture or
    sizes)."""
    with CheckpointReader(model_dir) as model, CheckpointReader(awq_dir) as awq:
        config, awq_config = model.config, awq.config
    if isinstance(config.get("quantization_config"), dict):
        raise ModelError(f"{model_dir} is quantized; give the unquantized model folder first, then the AWQ folder")
    qc = awq_quantization(awq_config, awq_dir)
    check_same_model(config, awq_config, str(model_dir), str(awq_dir), SAME_MODEL)
    return qc


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


def evaluate_awq(model_dir: str | os.PathLike, awq_dir: str | os.PathLike, reporter: Reporter | None = None, *,
                 options: QualityOptions | None = None, write: bool = True) -> dict:
    """The quality stage (``options``: its text, ctx and chunks; no gate, no stop test) on the AWQ folder and on
    round-to-nearest of the unquantized model at the same bits and group size: perplexities, mean KL divergence and
    same-top against the unquantized model, as ``releaser eval`` defines them. Written into the AWQ folder's
    awq_calibration.json under ``eval`` unless ``write`` is False."""
    from ..quality.load import Artefact
    from ..quality.stage import run_quality

    reporter = reporter or Reporter()
    model_dir, awq_dir = Path(model_dir), Path(awq_dir)
    qc = check_pair(model_dir, awq_dir)
    gs = int(qc["group_size"])
    options = (options or QualityOptions()).model_copy(update={"gate": False, "stop_test": False})
    rtn = Artefact(model_dir, "rtn", "RTN", "round-to-nearest", gs)
    with tempfile.TemporaryDirectory(prefix="releaser-awq-eval-") as tmp:
        report = run_quality(options, model_dir, [awq_dir, rtn], Path(tmp) / "awq-eval.json", reporter).facts
    awq, base = report["artefacts"]
    result = {"text": report["text"]["name"], "ctx": report["ctx"], "chunks": report["chunks"],
              "tokens": report["scored_tokens"], "group_size": gs, "bits": int(qc.get("bits", 4)),
              "perplexity": {"unquantized": report["model"]["ppl"], "awq": awq["ppl"], "rtn": base["ppl"]},
              "kld_mean": {"awq": awq["kld_mean"], "rtn": base["kld_mean"]},
              "same_top": {"awq": awq["same_top"], "rtn": base["same_top"]}}
    path = awq_dir / CALIBRATION_FILE
    if write and path.is_file():
        data = read_json(path, "make the folder again with releaser awq")
        data["eval"] = result
        write_file(path, json.dumps(data, indent=2) + "\n")
    elif write:
        reporter.warning(f"{awq_dir} has no {CALIBRATION_FILE} (not written by releaser awq); results not saved")
    return result
