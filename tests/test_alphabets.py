"""Alphabets: code ranges, levels, storage bits, step rules, rounding."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gpfq_jax as gq
from gpfq_jax.core.alphabets import make_alphabet, round_to_codes

BITS = st.sampled_from(["ternary", 2, 3, 4, 5, 6, 7, 8])
GRID = st.sampled_from(["int", "int_full", "zzs", "ls"])


@pytest.mark.parametrize(
    "grid,bits,levels,storage",
    [
        ("int", 2, 3, 2),
        ("int", 4, 15, 4),
        ("int", 8, 255, 8),
        ("int_full", 2, 4, 2),
        ("int_full", 4, 16, 4),
        ("zzs", 2, 5, 3),
        ("zzs", 4, 17, 5),
        ("zzs", 8, 257, 9),  # 2^b + 1 levels: b + 1 bits
        ("ls", 2, 4, 2),
        ("ls", 3, 8, 3),
        ("int", "ternary", 3, 2),
        ("ls", "ternary", 3, 2),
        ("asym", 4, 16, 4),  # codes 0..15 with a zero point
        ("asym", 8, 256, 8),
        ("asym", "ternary", 3, 2),
    ],
)
def test_levels_and_storage_bits(grid, bits, levels, storage):
    a = make_alphabet(bits, grid)
    assert a.levels == levels and a.storage_bits == storage
    assert len(np.unique(a.values(0.7))) == levels


def test_ls_grid_is_linspace():
    for bits in (2, 3, 4):
        spec = gq.QuantSpec(bits=bits, grid="ls", c=3.0)
        w = jnp.asarray(np.random.default_rng(0).normal(size=(50, 4)), jnp.float32)
        delta = float(gq.step_size(w, spec)[0])
        alpha = 3.0 * float(jnp.median(jnp.abs(w)))
        np.testing.assert_allclose(
            spec.alphabet.values(delta), np.linspace(-1, 1, 2**bits) * alpha, rtol=1e-5
        )
    ter = gq.QuantSpec(bits="ternary", grid="ls", c=3.0)
    assert ter.alphabet.values(1.0).tolist() == [-1.0, 0.0, 1.0]


def test_zzs_and_int_full_steps():
    w = jnp.asarray(np.random.default_rng(1).normal(size=(40, 6)), jnp.float32)
    zzs = gq.step_size(w, gq.QuantSpec(bits=3, grid="zzs", c=1.16))
    np.testing.assert_allclose(zzs, 1.16 * jnp.abs(w).max(0).mean() / 4, rtol=1e-6)
    full = gq.step_size(w, gq.QuantSpec(bits=4, grid="int_full"))
    np.testing.assert_allclose(full, jnp.abs(w).max(0) / 7.5, rtol=1e-6)


@settings(max_examples=60, deadline=None)
@given(bits=BITS, grid=GRID, seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-3, 1e3))
def test_codes_lie_on_alphabet(bits, grid, seed, scale):
    a = make_alphabet(bits, grid)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=200) * scale * 4, jnp.float32)
    delta = jnp.float32(scale)
    codes = np.asarray(round_to_codes(x, delta, a))
    assert np.all(codes == np.round(codes))
    assert codes.min() >= a.kmin and codes.max() <= a.kmax
    vals = np.asarray(gq.dequantize(codes, delta, a.offset))
    levels = a.values(float(delta))
    # nearest level: no level is closer than the chosen one
    best = np.abs(np.asarray(x)[:, None] - levels[None]).min(1)
    np.testing.assert_allclose(np.abs(np.asarray(x) - vals), best, rtol=1e-5, atol=1e-6 * scale)
    sto = round_to_codes(x, delta, a, jax.random.uniform(jax.random.PRNGKey(seed), x.shape))
    assert np.all(np.isin(np.asarray(sto), np.arange(a.kmin, a.kmax + 1)))


@pytest.mark.parametrize("bad", [1, 9, 0, 2.5, "two", True, -3])
def test_bits_out_of_range(bad):
    with pytest.raises(ValueError, match="bits"):
        gq.QuantSpec(bits=bad)


def test_log2_3_is_ternary_and_bad_fields():
    assert gq.QuantSpec(bits=math.log2(3)).bits == "ternary"
    with pytest.raises(ValueError, match="grid"):
        gq.QuantSpec(grid="fp4")
    with pytest.raises(ValueError, match="scale"):
        gq.QuantSpec(scale="p99")
    with pytest.raises(ValueError, match="c must"):
        gq.QuantSpec(c=-1.0)
    with pytest.raises(ValueError, match="rounding"):
        gq.QuantSpec(rounding="up")
