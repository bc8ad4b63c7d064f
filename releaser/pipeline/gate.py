"""The verification gate, run before anything is published: every check runs, and a failure lists them all.

- the main folder: the doctor (with the stop test) is clean against the recipe's template;
- the stop audit (the verify stage's sampled answers): every token the model ended an answer with is a stop of every
  artefact (the main folder's and each quant folder's generation_config.json, each GGUF's end-of-generation set as
  llama.cpp builds it) and runtime file (Ollama's ``params``, LM Studio's ``model.yaml``);
- each GGUF: it parses, its eos is the main folder's end-of-turn token, llama.cpp ends generation on every id the
  main folder's generation_config.json declares, and its chat template equals the main folder's;
- the quality report, when the quality stage ran: every artefact passed its KLD limit and the stop test;
- each card: no placeholder, valid Hub metadata (the card renderer's own check);
- every artefact: size and sha256 equal the manifest's (read again from disk here for ``merged`` and the quality
  report, and by the publish step for every file it sends).
"""

from __future__ import annotations

from ..errors import GateError
from .context import Release


def _gguf_checks(r: Release, eos: str | None, template: str | None) -> list[str]:
    from ..errors import ModelError
    from ..gguf.reader import GGUFFile
    from ..gguf.stops import declared_stop_ids, llama_eog_ids

    problems = []
    stops = declared_stop_ids(r.main_dir)
    for path in sorted(r.gguf_dir.glob("*.gguf")):
        if "-of-" in path.name and "-00001-of-" not in path.name:
            continue
        try:
            field = GGUFFile(path).values.get
        except ModelError as exc:
            problems.append(str(exc))
            continue
        tokens = field("tokenizer.ggml.tokens") or []
        tid = field("tokenizer.ggml.eos_token_id")
        text = tokens[tid] if tid is not None and tid < len(tokens) else None
        if text != eos:
            problems.append(f"{path.name}: tokenizer.ggml.eos_token_id is {tid} ({text!r}), the main folder's "
                            f"end-of-turn token is {eos!r}")
        special = {k: field(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")}
        for key in ("eot", "eom"):   # a stale slot would stop on a token the main folder no longer declares
            if special[key] is not None and special[key] not in stops:
                tid = special[key]
                problems.append(f"{path.name}: tokenizer.ggml.{key}_token_id is {tid} "
                                f"({tokens[tid] if tid < len(tokens) else None!r}), which the main folder does not "
                                "declare a stop")
        eog = llama_eog_ids(tokens, special)
        if missing := [i for i in stops if i < len(tokens) and i not in eog]:
            problems.append(f"{path.name}: llama.cpp does not stop on {', '.join(repr(tokens[i]) for i in missing)}, "
                            "which the main folder's generation_config.json lists in eos_token_id")
        if field("tokenizer.chat_template") != template:
            problems.append(f"{path.name}: its chat template differs from the main folder's")
    return problems


def _side_file_checks(r: Release) -> list[str]:
    """Each safetensors quant folder (AWQ, W4A16, MLX) carries the main folder's tokenizer and generation files,
    byte for byte (its chat template and end-of-turn tokens are the main folder's), and its config.json says how its
    weights are quantized, as its loaders read it."""
    from ..checkpoint.config import read_config
    from ..errors import ReleaserError
    from ..formats.common import SIDE_FILES
    from ..quality.load import folder_kind

    problems = []
    made = set(r.repo_folders().values())
    q = r.recipe.quants
    for stage, repo, folder_of in (("awq", q.awq, "awq_dir"), ("w4a16", q.w4a16, "w4a16_dir"),
                                   ("mlx", q.mlx, "mlx_dir")):
        folder = getattr(r, folder_of) if repo else None
        if folder is None or folder not in made:
            continue
        for name in SIDE_FILES:
            ours, theirs = r.main_dir / name, folder / name
            if ours.is_file() != theirs.is_file() or (ours.is_file() and ours.read_bytes() != theirs.read_bytes()):
                problems.append(f"{folder.name}: {name} differs from the main folder's (rebuild it with --only "
                                f"{stage} --force)")
        try:
            kind = folder_kind(read_config(folder))
        except ReleaserError as exc:
            problems.append(f"{folder.name}: {exc}")
            continue
        if kind is None or kind[0] != stage:
            problems.append(f"{folder.name}/config.json does not describe {stage} weights (rebuild it with --only "
                            f"{stage} --force)")
    return problems


def _audit_checks(r: Release) -> list[str]:
    """Every token the stop audit saw the model end an answer with stops every artefact and runtime file."""
    import json

    import yaml

    from ..gguf.reader import GGUFFile
    from ..gguf.stops import declared_stop_ids, llama_eog_ids
    from ..runtimes.files import LMSTUDIO_YAML, OLLAMA_PARAMS

    verify = r.manifest.stage("verify")
    audit = (verify or {}).get("facts", {}).get("stop_audit")
    if not audit or not audit.get("endings"):
        return []
    endings: dict[str, int] = audit["endings"]
    fix = "tokenizer: {eos: [" + ", ".join(t for t in dict.fromkeys([audit.get("end_of_turn"), *endings]) if t) + "]}"
    problems = []

    def check(where: str, ids: set[int] | None = None, texts: list[str] | None = None) -> None:
        missing = [t for t, i in endings.items() if (ids is not None and i not in ids)
                   or (texts is not None and t not in texts)]
        if missing:
            problems.append(f"{where} does not stop on {', '.join(map(repr, missing))}, which the model ends answers "
                            f"with (stop audit); declare it in the recipe: {fix}")

    made = set(r.repo_folders().values())
    q = r.recipe.quants
    for folder in [r.main_dir] + [getattr(r, d) for repo, d in ((q.awq, "awq_dir"), (q.w4a16, "w4a16_dir"),
                                                               (q.mlx, "mlx_dir")) if repo]:
        if folder in made:
            check(f"{folder.name}/generation_config.json", ids=set(declared_stop_ids(folder)))
    if r.recipe.gguf is not None and r.gguf_dir in made:
        for path in sorted(r.gguf_dir.glob("*.gguf")):
            if "-of-" in path.name and "-00001-of-" not in path.name:
                continue
            try:
                field = GGUFFile(path).values.get
            except Exception:  # noqa: BLE001 - a file that does not parse is reported by the GGUF checks
                continue
            tokens = field("tokenizer.ggml.tokens") or []
            special = {k: field(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")}
            check(path.name, ids=llama_eog_ids(tokens, special))
        recorded = {f["path"] for f in (r.manifest.stage("runtimes") or {}).get("files", [])}
        if OLLAMA_PARAMS in recorded and (r.gguf_dir / OLLAMA_PARAMS).is_file():
            stops = json.loads((r.gguf_dir / OLLAMA_PARAMS).read_text(encoding="utf-8")).get("stop") or []
            check(f"{r.gguf_dir.name}/{OLLAMA_PARAMS} (Ollama)", texts=list(stops))
        if LMSTUDIO_YAML in recorded and (r.gguf_dir / LMSTUDIO_YAML).is_file():
            data = yaml.safe_load((r.gguf_dir / LMSTUDIO_YAML).read_text(encoding="utf-8")) or {}
            fields = data.get("config", {}).get("operation", {}).get("fields", [])
            stops = next((f.get("value") for f in fields if f.get("key") == "llm.prediction.stopStrings"), None)
            check(f"{r.gguf_dir.name}/{LMSTUDIO_YAML} (LM Studio)", texts=list(stops or []))
    return problems


def _main_tokenizer(r: Release) -> tuple[str | None, str | None]:
    from ..tokenizer.model import ModelFolder

    model = ModelFolder.open(r.main_dir)
    return model.tokenizer.eos_token, getattr(model.tokenizer, "chat_template", None)


def check_release(r: Release) -> None:
    """Raise GateError listing every failed check."""
    from ..card.render import CardError, check_card
    from ..tokenizer.doctor import diagnose

    problems: list[str] = []
    report = diagnose(r.main_dir, r.template())
    problems += [f"{r.main_dir.name}: {f.problem}" for f in report.findings if f.severity == "error"]
    eos, template = _main_tokenizer(r)
    if r.recipe.gguf is not None:
        problems += _gguf_checks(r, eos, template)
    for folder in r.repo_folders().values():
        card = folder / "README.md"
        try:
            check_card(card.read_text(encoding="utf-8"), card)
        except (OSError, CardError) as exc:
            problems.append(f"{card.relative_to(r.work)}: {exc}")
    quality = r.manifest.stage("quality")
    if quality is not None and not quality["facts"].get("gate", {}).get("passed", True):
        problems += [f"quality: {f}" for f in quality["facts"]["gate"]["failures"]]
    problems += _side_file_checks(r)
    problems += _audit_checks(r)
    for stage in ("merge", "tokenizer", "gguf", "runtimes", "awq", "w4a16", "mlx", "quality", "cards"):
        entry = r.manifest.stage(stage)
        if entry is None:
            continue
        # the repo folders' files are read again by the publish step itself, before it sends anything
        wrong = r.manifest.intact(r.work / entry["root"], entry["files"], rehash=stage in ("merge", "quality"))
        if wrong:
            problems.append(f"{stage}: {wrong} (rebuild it with --only {stage} --force)")
    if problems:
        raise GateError(f"the release failed {len(problems)} check(s), nothing was published: "
                        + "; ".join(problems))

