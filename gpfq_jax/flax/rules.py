"""Per-layer rules: skip a layer or override its spec / method, selected by regex on its name.

A layer's name is its path joined by "/" (Linen: module path in ``variables['params']``, e.g.
``"block_0/Conv_1"``; NNX: attribute path, e.g. ``"layers/0"``). Rules are tried in order with
``re.search``; the first match wins. A rule that matches no layer is an error (a typo would
otherwise silently quantize everything).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from gpfq_jax.core.alphabets import QuantSpec, as_spec
from gpfq_jax.core.layer import METHODS


@dataclasses.dataclass(frozen=True)
class Rule:
    """Override for the layers whose name matches ``pattern`` (``re.search``).

    skip: leave the layer float. spec: a QuantSpec replaces the base spec; a dict replaces only
    the fields it names (``{"bits": 8}``). method: one of ``METHODS``. bits:
    shorthand for ``spec={"bits": bits}`` applied last.
    """

    pattern: str
    skip: bool = False
    spec: QuantSpec | dict | None = None
    method: str | None = None
    bits: int | float | str | None = None

    def __post_init__(self):
        if not isinstance(self.pattern, str):
            raise TypeError(f"rule pattern must be a string, got {type(self.pattern).__name__}")
        if not isinstance(self.skip, bool):
            raise TypeError(f"rule {self.pattern!r}: skip must be True or False, got {self.skip!r}")
        if isinstance(self.spec, Mapping):
            unknown = set(self.spec) - {f.name for f in dataclasses.fields(QuantSpec)}
            if unknown:
                raise ValueError(f"rule {self.pattern!r}: spec has unknown fields "
                                 f"{sorted(unknown)}")  # fmt: skip
        try:  # the bits and spec overrides must make a valid spec on their own
            if self.bits is not None:
                QuantSpec(bits=self.bits)
            if isinstance(self.spec, Mapping):
                dataclasses.replace(QuantSpec(), **dict(self.spec))
        except (TypeError, ValueError) as e:
            raise type(e)(f"rule {self.pattern!r}: {e}") from e
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"rule pattern {self.pattern!r} is not a valid regex: {e}") from e
        if self.method is not None and self.method not in METHODS:
            raise ValueError(
                f"rule {self.pattern!r}: unknown method {self.method!r}; expected one of {METHODS}"
            )
        if self.spec is not None and not isinstance(self.spec, QuantSpec | Mapping):
            raise TypeError(
                f"rule {self.pattern!r}: spec must be a QuantSpec or a dict, got "
                f"{type(self.spec).__name__}"
            )

    def apply(self, spec: QuantSpec, method: str) -> tuple[QuantSpec, str]:
        """The (spec, method) of a matched layer, from the base ones."""
        if isinstance(self.spec, QuantSpec):
            spec = self.spec
        elif self.spec is not None:
            spec = dataclasses.replace(spec, **dict(self.spec))
        if self.bits is not None:
            spec = dataclasses.replace(spec, bits=self.bits)
        return spec, self.method or method


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """What happens to one layer: skipped, or quantized with ``spec`` and ``method``."""

    name: str
    skip: bool
    spec: QuantSpec
    method: str


def as_rule(rule: Rule | Sequence | Mapping) -> Rule:
    """Accept a Rule, a tuple ``(pattern, skip, spec, method, bits)`` (prefix) or a dict."""
    if isinstance(rule, Rule):
        return rule
    if isinstance(rule, str):
        raise TypeError(
            f"a rule must be a Rule, tuple or dict, got the string {rule!r}; "
            f"use Rule({rule!r}, skip=True) or similar"
        )
    if not isinstance(rule, Mapping | Sequence):
        raise TypeError(f"a rule must be a Rule, tuple or dict, got {type(rule).__name__}")
    try:
        return Rule(**rule) if isinstance(rule, Mapping) else Rule(*rule)
    except TypeError as e:
        if "argument" not in str(e):  # Rule's own messages already name the rule
            raise
        raise TypeError(f"rule {rule!r} does not fit Rule(pattern, skip, spec, method, bits): "
                        f"{e}") from e  # fmt: skip


def plan_layers(
    names: Sequence[str],
    rules: Sequence[Any] | None,
    spec: QuantSpec | dict | None,
    method: str,
    kinds: Sequence[str] | None = None,
) -> list[LayerPlan]:
    """One LayerPlan per layer name (first matching rule wins).

    ``kinds`` (one per name): embeddings ("embed") stay float unless their first matching
    rule sets ``method="rtn"`` (they have no input data for GPFQ or GPTQ); a rule that
    matches only embeddings and does not is an error. Raises ValueError naming the pattern
    and listing the layer names if a rule matches no layer.
    """
    base = as_spec(spec)
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if isinstance(rules, Rule | str | Mapping) or (
        rules is not None and not isinstance(rules, list | tuple)
    ):
        raise TypeError(
            f"rules must be a list of Rule (or tuples / dicts), got {type(rules).__name__} "
            f"{rules!r}; wrap a single rule in a list: rules=[Rule(...)]"
        )
    parsed = [as_rule(r) for r in (rules or ())]
    if not names:
        raise ValueError("the model has no quantizable layer (Dense / nnx.Linear / Conv / "
                         "nnx.Conv) in its forward pass")  # fmt: skip
    for r in parsed:
        if not any(re.search(r.pattern, n) for n in names):
            raise ValueError(
                f"rule pattern {r.pattern!r} matches no layer; layer names: "
                f"{', '.join(names) or '(none)'}"
            )
    kinds = list(kinds) if kinds is not None else ["dense"] * len(names)
    plans, rule_hits = [], {id(r): [] for r in parsed}
    for n, kind in zip(names, kinds):
        rule = next((r for r in parsed if re.search(r.pattern, n)), None)
        if rule is not None:
            rule_hits[id(rule)].append(kind)
        if rule is None:
            plans.append(LayerPlan(n, kind == "embed", base, method))
        else:
            s, m = rule.apply(base, method)
            plans.append(LayerPlan(n, rule.skip or (kind == "embed" and m != "rtn"), s, m))
    for r in parsed:
        hits = rule_hits[id(r)]
        if hits and all(k == "embed" for k in hits) and not r.skip and r.method != "rtn":
            raise ValueError(
                f"rule {r.pattern!r} matches only embeddings (nn.Embed / nnx.Embed), which have "
                "no input data for GPFQ or GPTQ: give it method='rtn' to quantize them"
            )
    return plans


__all__ = ["Rule", "LayerPlan", "as_rule", "plan_layers"]
