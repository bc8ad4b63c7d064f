"""Merge-method facts for cards: pretty name, paper link and a plain explanation, from the merge method registry."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ModelError


@dataclass(frozen=True)
class MethodFacts:
    name: str
    pretty_name: str
    reference_url: str
    description: str


def method_facts(name: str) -> MethodFacts:
    """Describe merge method ``name`` using ``releaser.merge.methods`` (the same registry the merge engine uses)."""
    from ..merge.methods import get_method, method_names

    try:
        m = get_method(name)
    except KeyError:
        raise ModelError(f"the merge config uses merge method {name!r}, which releaser does not know "
                         f"(known: {', '.join(method_names())}); fix merge_method in mergekit_config.yml") from None
    return MethodFacts(m.name, m.pretty_name, m.reference_url, " ".join(m.description.split()))
