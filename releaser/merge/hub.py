"""Hub model references: ``org/name`` or ``org/name@revision`` resolved to a local snapshot through huggingface_hub
(its cache under HF_HOME, HF_HUB_OFFLINE, HF_TOKEN, HF_ENDPOINT), downloading only what a merge reads."""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

from ..errors import ModelError

HUB_REF = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")

MODEL_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
               "chat_template.jinja", "chat_template.json"]
SAFETENSORS = ["*.safetensors", "model.safetensors.index.json"]
BINARY = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"]


def is_hub_ref(ref: str) -> bool:
    return bool(HUB_REF.match(ref)) and not Path(ref).exists()


def resolve(ref: str, kind: str = "model") -> str:
    """A local folder for ``ref``: the path itself when it exists, else the Hub snapshot (downloaded if needed)."""
    if Path(ref).exists():
        return ref
    m = HUB_REF.match(ref)
    what = "LoRA adapter" if kind == "adapter" else "model"
    if not m:
        raise ModelError(f"{what} {ref} not found: it is neither a local folder nor a Hub id (org/name[@revision]); "
                         "check the path")
    repo, revision = m.group("repo"), m.group("rev")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    at = f"{repo}@{revision}" if revision else repo
    try:
        if kind == "adapter":
            patterns = ADAPTER_FILES
        elif constants.HF_HUB_OFFLINE:
            patterns = MODEL_FILES + SAFETENSORS + BINARY   # only what the cache holds is looked at
        else:
            patterns = MODEL_FILES + _weight_patterns(repo, revision)
        with _quiet():   # the library never prints: no huggingface_hub progress bars
            folder = snapshot_download(repo, revision=revision, allow_patterns=patterns)
    except RevisionNotFoundError:
        raise ModelError(f"{what} {at}: the revision {revision} does not exist on the Hub; check the @revision") \
            from None
    except GatedRepoError:
        raise ModelError(f"{what} {at} is gated: accept its terms on the Hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ModelError(f"{what} {at} not found: no local folder of that name and no such Hub repo (or it is "
                         "private: set HF_TOKEN)") from None
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise ModelError(f"{what} {at} is no local folder and is not in the Hugging Face cache (HF_HUB_OFFLINE is "
                             "set); check the path, or download it first ("
                             f"hf download {repo}{f' --revision {revision}' if revision else ''}) or unset "
                             "HF_HUB_OFFLINE") from None
        raise ModelError(f"{what} {at} is no local folder, and the Hub cannot be reached and does not have it in the "
                         "cache; check the path, the network or HF_ENDPOINT") from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        raise ModelError(f"{what} {at}: the Hub answered HTTP {status}; try again later or check HF_TOKEN") from None
    except OSError as exc:
        raise ModelError(f"{what} {at}: cannot write the Hugging Face cache ({exc.strerror or exc}); "
                         "check HF_HOME and free space") from None
    return folder


@contextmanager
def _quiet():
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was:
            enable_progress_bars()


def _weight_patterns(repo: str, revision: str | None) -> list[str]:
    """safetensors when the repo has them, else pytorch_model*.bin (never both)."""
    from huggingface_hub import HfApi

    files = HfApi().list_repo_files(repo, revision=revision)
    return SAFETENSORS if any(f.endswith(".safetensors") for f in files) else BINARY
