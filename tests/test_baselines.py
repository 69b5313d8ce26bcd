"""RTN and GPTQ against straightforward numpy references."""

import jax.numpy as jnp
import numpy as np
import pytest

import gpfq_jax as gq
from gpfq_jax.core.alphabets import make_alphabet


def numpy_gptq(w, h, delta, alphabet, damp=0.01, act_order=False):
    """GPTQ column by column, no blocks (Frantar et al. 2022, Alg. 1 with B = 1)."""
    w, h = np.array(w, np.float64), np.array(h, np.float64)
    n = w.shape[0]
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(n)
    w, h = w[perm], h[perm][:, perm]
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    h += damp * np.mean(np.diag(h)) * np.eye(n)
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # H^{-1} = U^T U
    codes = np.zeros_like(w)
    for i in range(n):
        s = w[i] / delta - alphabet.offset
        codes[i] = np.clip(np.round(s), alphabet.kmin, alphabet.kmax)
        err = (w[i] - delta * (codes[i] + alphabet.offset)) / u[i, i]
        w[i:] -= np.outer(u[i, i:], err)
    return codes[np.argsort(perm)]


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("grid,bits", [("int", 3), ("int_full", 2), ("ls", 2), ("zzs", 4)])
def test_gptq_equals_numpy_reference(x64, rng, act_order, grid, bits):
    m, n, n_out = 80, 23, 6
    x = rng.normal(size=(m, n)) @ rng.normal(size=(n, n)) / np.sqrt(n)
    x[:, 5] = 0.0  # a dead input
    w = rng.normal(size=(n, n_out))
    h = x.T @ x
    alphabet = make_alphabet(bits, grid)
    delta = np.asarray(gq.step_size(jnp.asarray(w), gq.QuantSpec(bits=bits, grid=grid)))
    ref = numpy_gptq(w, h, delta, alphabet, act_order=act_order)
    for block in (1, 4, 23):
        got = gq.gptq_codes(
            jnp.asarray(w),
            jnp.asarray(h),
            jnp.asarray(delta),
            alphabet,
            block_size=block,
            act_order=act_order,
        )
        np.testing.assert_array_equal(np.asarray(got), ref)


def test_rtn_is_nearest_level(rng):
    w = jnp.asarray(rng.normal(size=(30, 5)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(50, 30)), jnp.float32)
    spec = gq.QuantSpec(bits=3, grid="ls", per_channel=True)
    r = gq.quantize_layer(w, x, spec=spec, method="rtn")
    levels = spec.alphabet.values(1.0)[None, None, :] * np.asarray(r.scale)[None, :, None]
    nearest = np.take_along_axis(
        levels[0].T[None].repeat(30, 0).transpose(0, 2, 1),
        np.abs(np.asarray(w)[..., None] - levels).argmin(-1)[..., None],
        -1,
    )[..., 0]
    np.testing.assert_allclose(np.asarray(r.q), nearest, rtol=1e-6)


def test_gptq_beats_rtn_on_correlated_inputs(rng):
    n = 64
    x = jnp.asarray(rng.normal(size=(1000, n)) @ rng.normal(size=(n, n)) / 8, jnp.float32)
    w = jnp.asarray(rng.normal(size=(n, 16)) / 8, jnp.float32)
    spec = gq.QuantSpec(bits=3)
    assert (
        gq.quantize_layer(w, x, spec=spec, method="gptq").rel_error
        < gq.quantize_layer(w, x, spec=spec, method="rtn").rel_error
    )
