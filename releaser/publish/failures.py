"""How a failed Hub call is classified: transient (retry after re-planning, with the server's Retry-After) or
permanent (a one-line PublishError), and its reason in one line (never headers, never the token)."""

from __future__ import annotations

import email.utils
import time

from huggingface_hub.errors import HfHubHTTPError

from .options import PublishError

try:  # huggingface_hub 2.x
    import httpx2 as _httpx
except ImportError:  # pragma: no cover - huggingface_hub 1.x
    import httpx as _httpx

TRANSPORT_ERRORS = (_httpx.TransportError,)
UNREACHABLE = (_httpx.ConnectError,)  # no connection at all: the endpoint is wrong or the network is down
TRANSIENT_STATUS = {408, 409, 412, 425, 429, 500, 502, 503, 504}


def status_of(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def root_cause(exc: BaseException) -> BaseException:
    """The HTTP or transport error behind a client exception (uploads wrap theirs in RuntimeError)."""
    seen = 0
    while not isinstance(exc, (HfHubHTTPError, *TRANSPORT_ERRORS)) and exc.__cause__ is not None and seen < 10:
        exc, seen = exc.__cause__, seen + 1
    return exc


def retry_after(exc: BaseException) -> float | None:
    """Seconds from a ``Retry-After`` header (delta or HTTP date), if the error's response has one."""
    response = getattr(exc, "response", None)
    value = response.headers.get("Retry-After") if response is not None else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - time.time())


def one_line(exc: BaseException) -> str:
    """A short, single-line reason for an error (server message if any; never headers or the token)."""
    server = getattr(exc, "server_message", None)
    status = status_of(exc)
    text = (server or str(exc) or type(exc).__name__).strip()
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    if status is not None and str(status) not in first:
        first = f"HTTP {status}: {first}"
    return first[:300]


def is_transient(exc: BaseException) -> bool:
    cause = root_cause(exc)
    if isinstance(cause, TRANSPORT_ERRORS):
        return True
    return status_of(cause) in TRANSIENT_STATUS


def auth_error(exc: BaseException, repo_id: str) -> PublishError | None:
    status = status_of(root_cause(exc))
    if status == 401:
        return PublishError(f"the Hub rejected the token (401) for {repo_id}; set HF_TOKEN to a valid token with "
                            "write access or run `hf auth login`")
    if status == 403:
        return PublishError(f"the token has no write access to {repo_id} (403); use a token with write access to "
                            f"{repo_id.split('/')[0]}, or --create-pr to propose the change to an existing repo")
    return None
