"""Publishing a release: plan each repo's change from content hashes, show it, send only the difference (Hub via
huggingface_hub, or local mirror folders), delete what is stale, tag, verify.

``run_publish``, ``RepoPlan`` and ``plan_repo`` are loaded on first use, so that the recipe can read the ``publish:``
options without importing huggingface_hub's client."""

from .options import PublishError, PublishOptions

__all__ = ["PublishError", "PublishOptions", "RepoPlan", "plan_repo", "run_publish"]


def __getattr__(name: str):
    if name in ("RepoPlan", "plan_repo"):
        from . import plan

        return getattr(plan, name)
    if name == "run_publish":
        from .stage import run_publish

        return run_publish
    raise AttributeError(name)
