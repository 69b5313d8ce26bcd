"""Bad per-layer rules: every error names the rule (its pattern) and what is wrong with it."""

from __future__ import annotations

import pytest
from _faultkit import check, error_cases, expect_error, fault, qp

import gpfq_jax as gq

R = gq.Rule


def P(rules):
    return lambda: qp(rules=rules)


LIST = r"rules must be a list of Rule \(or tuples / dicts\), got "

RULES = error_cases(
    ("single-Rule-not-in-list", P(R("Dense_0", skip=True)), TypeError,
     LIST + r"Rule Rule\(pattern='Dense_0'.*wrap a single rule in a list"),
    ("string", P("Dense_0"), TypeError, LIST + r"str 'Dense_0'; wrap a single rule in a list"),
    ("dict-not-in-list", P({"pattern": "Dense_0"}), TypeError, LIST + r"dict \{'pattern'"),
    ("set", P({R("Dense_0")}), TypeError, LIST + r"set"),
    ("generator", P(r for r in [R("Dense_0")]), TypeError, LIST + r"generator"),
    ("tuple-skip-yes", P([("Dense_0", "yes")]), TypeError,
     r"rule 'Dense_0': skip must be True or False, got 'yes'$"),
    ("Rule-skip-1", lambda: R("Dense_0", skip=1), TypeError,
     r"rule 'Dense_0': skip must be True or False, got 1$"),
    ("dict-unknown-key", P([{"pattern": "Dense_0", "skp": True}]), TypeError,
     r"rule \{'pattern': 'Dense_0', 'skp': True\} does not fit Rule\(pattern, skip, spec, "
     r"method, bits\).*'skp'"),
    ("dict-without-pattern", P([{"skip": True}]), TypeError,
     r"rule \{'skip': True\} does not fit Rule.*'pattern'"),
    ("tuple-too-long", P([("Dense_0", False, None, None, 4, 5)]), TypeError,
     r"rule \('Dense_0', False, None, None, 4, 5\) does not fit Rule"),
    ("empty-tuple", P([()]), TypeError, r"rule \(\) does not fit Rule.*'pattern'"),
    ("spec-dict-unknown-field", lambda: R("Dense_0", spec={"bitz": 3}), ValueError,
     r"rule 'Dense_0': spec has unknown fields \['bitz'\]$"),
    ("spec-dict-unknown-field-in-list", P([{"pattern": "Dense_1", "spec": {"grd": "int"}}]),
     ValueError, r"rule 'Dense_1': spec has unknown fields \['grd'\]$"),
    ("spec-dict-bad-grid", P([{"pattern": "Dense_0", "spec": {"grid": "foo"}}]), ValueError,
     r"rule 'Dense_0': unknown grid 'foo'"),
    ("spec-dict-bad-c", lambda: R("Dense_0", spec={"c": 0}), ValueError,
     r"rule 'Dense_0': c must be a finite number > 0, got 0$"),
    ("spec-str", P([("Dense_0", False, "int4")]), TypeError,
     r"rule 'Dense_0': spec must be a QuantSpec or a dict, got str$"),
    ("bits-9", lambda: R("Dense_0", bits=9), ValueError,
     r"rule 'Dense_0': bits must be an integer in 2\.\.8 or 'ternary', got 9$"),
    ("bits-9-tuple", P([("Dense_1", False, None, None, 9)]), ValueError,
     r"rule 'Dense_1': bits must be .*got 9$"),
    ("bits-str", lambda: R("Dense_0", bits="4"), ValueError, r"rule 'Dense_0': bits .*got '4'$"),
    ("bad-regex", lambda: R("Dense_("), ValueError,
     r"rule pattern 'Dense_\(' is not a valid regex: missing \)"),
    ("bad-regex-in-tuple", P([("[Dense",)]), ValueError,
     r"rule pattern '\[Dense' is not a valid regex"),
    ("pattern-matches-no-layer", P([R("Conv", skip=True)]), ValueError,
     r"rule pattern 'Conv' matches no layer; layer names: Dense_0, Dense_1$"),
    ("second-pattern-matches-no-layer", P([R("Dense_0", bits=8), R("dense_1", bits=2)]),
     ValueError, r"rule pattern 'dense_1' matches no layer; layer names: Dense_0, Dense_1$"),
    ("pattern-not-str", P([(5,)]), TypeError, r"rule pattern must be a string, got int$"),
    ("method-unknown", lambda: R("Dense_0", method="foo"), ValueError,
     r"rule 'Dense_0': unknown method 'foo'; expected one of \('gpfq', 'rtn', 'gptq', 'qronos'\)$"),
    ("method-unknown-tuple", P([("Dense_1", False, None, "GPTQ")]), ValueError,
     r"rule 'Dense_1': unknown method 'GPTQ'"),
    ("rule-int", P([5]), TypeError, r"a rule must be a Rule, tuple or dict, got int$"),
    ("rule-None", P([None]), TypeError, r"a rule must be a Rule, tuple or dict, got NoneType$"),
    ("rule-str-in-list", P(["Dense_0"]), TypeError,
     r"a rule must be a Rule, tuple or dict, got the string 'Dense_0'; use Rule\('Dense_0', "
     r"skip=True\)"),
    ("gptq-rule-with-stochastic-base", lambda: qp(
        rules=[R("Dense_1", method="gptq")], spec={"rounding": "stochastic"}), ValueError,
     r"layer 'Dense_1': gptq supports rounding='nearest' without sparsity only$"),
)  # fmt: skip


@fault("rules")
@pytest.mark.parametrize("call, exc, pattern", RULES)
def test_bad_rules(call, exc, pattern):
    expect_error(call, exc, pattern)


@fault("rules", "result")
def test_rules_apply_first_match_and_skip():
    """Well-formed rules do what they say: first match wins, skip leaves the layer float,
    bits overrides the spec; tuples and dicts mean the same as Rule."""
    res = qp(rules=[("Dense_1", True), {"pattern": "Dense_", "bits": 2}, R("Dense_0", bits=8)])
    check(res.skipped == ["Dense_1"], f"skipped {res.skipped}")
    check([r.name for r in res.layers] == ["Dense_0"], f"layers {[r.name for r in res.layers]}")
    check(res["Dense_0"].spec.bits == 2, f"Dense_0 bits {res['Dense_0'].spec.bits} (not 2)")
