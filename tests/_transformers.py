"""Tiny transformer stacks (Linen and NNX) for the frontier-driver tests.

Every model is a Dense, then ``n`` identical pre-norm residual blocks chained on the hidden
state (with extra arguments computed once before the first block), then a Dense head. The
widths are tiny (d = 8) so that a whole quantization run takes seconds on a CPU.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

D = 8  # model width
IN = 4  # input features
OUT = 3  # head outputs
SEQ = 5  # tokens


# ----------------------------------------------------------------------------- Linen


class LinenLayer(nn.Module):
    """Pre-norm block: Flax attention (with a mask), a SwiGLU MLP (nn.Dense), a DenseGeneral
    with multi-axis features and an Einsum with a batch letter (h), and a positions input."""

    @nn.compact
    def __call__(self, x, pos, *, mask):  # x (b, t, 8), pos (b, t), mask (b, 1, t, t)
        h = nn.LayerNorm(name="norm1")(x)
        attn = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=D, name="attn")
        x = x + attn(h, h, mask=mask)
        h = nn.RMSNorm(name="norm2")(x)
        gate = nn.Dense(16, use_bias=False, name="gate")(h)
        up = nn.Dense(16, use_bias=False, name="up")(h)
        x = x + nn.Dense(D, name="down")(nn.silu(gate) * up)
        y = nn.DenseGeneral((2, 4), name="dg")(x)  # (b, t, 2, 4): multi-axis features
        y = nn.Einsum((2, 4, 4), "bthe,hed->bthd", use_bias=False, name="ein")(y)  # h: batch
        return x + 0.5 * y.reshape(x.shape) + 0.01 * pos[..., None]


class LinenStack(nn.Module):
    """Dense ``inp``, blocks ``layers_0`` ... ``layers_{n-1}``, Dense ``head``."""

    n: int = 2

    @nn.compact
    def __call__(self, x):  # x (b, t, 4)
        x = nn.Dense(D, name="inp")(x)
        b, t = x.shape[:2]
        pos = jnp.broadcast_to(jnp.arange(t, dtype=x.dtype), (b, t))
        mask = nn.make_causal_mask(jnp.ones((b, t)))
        for i in range(self.n):
            x = LinenLayer(name=f"layers_{i}")(x, pos, mask=mask)
        return nn.Dense(OUT, name="head")(x)


LINEN_BLOCK_LAYERS = ["attn/query", "attn/key", "attn/value", "attn/out", "gate", "up", "down",
                      "dg", "ein"]  # fmt: skip


def linen_layer_names(n: int) -> list[str]:
    inner = [f"layers_{i}/{name}" for i in range(n) for name in LINEN_BLOCK_LAYERS]
    return ["inp", *inner, "head"]


# ----------------------------------------------------------------------------- NNX


class NnxLayer(nnx.Module):
    """The NNX block: grouped-query attention (4 query heads, 2 kv heads), SwiGLU MLP,
    LinearGeneral with multi-axis features, an Einsum with a batch letter; a mask argument."""

    def __init__(self, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=4, num_kv_heads=2, in_features=D,
                                           qkv_features=D, decode=False, rngs=rngs)  # fmt: skip
        self.norm2 = nnx.RMSNorm(D, rngs=rngs)
        self.gate = nnx.Linear(D, 16, use_bias=False, rngs=rngs)
        self.up = nnx.Linear(D, 16, use_bias=False, rngs=rngs)
        self.down = nnx.Linear(16, D, use_bias=False, rngs=rngs)
        self.dg = nnx.LinearGeneral(D, (2, 4), rngs=rngs)
        self.ein = nnx.Einsum("bthe,hed->bthd", (2, 4, 4), (2, 4), rngs=rngs)

    def __call__(self, x, mask=None):
        x = x + self.attn(self.norm1(x), mask=mask)
        h = self.norm2(x)
        x = x + self.down(nnx.silu(self.gate(h)) * self.up(h))
        return x + 0.5 * self.ein(self.dg(x)).reshape(x.shape)


class NnxStack(nnx.Module):
    """Linear ``inp``, ``layers`` (an nnx.List of blocks), Linear ``head``."""

    def __init__(self, n: int, rngs: nnx.Rngs):
        self.inp = nnx.Linear(IN, D, rngs=rngs)
        self.layers = nnx.List([NnxLayer(rngs) for _ in range(n)])
        self.head = nnx.Linear(D, OUT, rngs=rngs)

    def __call__(self, x):
        x = self.inp(x)
        mask = nnx.make_causal_mask(jnp.ones(x.shape[:2]))
        for blk in self.layers:
            x = blk(x, mask=mask)
        return self.head(x)


NNX_BLOCK_LAYERS = ["attn/query", "attn/key", "attn/value", "attn/out", "gate", "up", "down",
                    "dg", "ein"]  # fmt: skip


def nnx_layer_names(n: int) -> list[str]:
    inner = [f"layers/{i}/{name}" for i in range(n) for name in NNX_BLOCK_LAYERS]
    return ["inp", *inner, "head"]


# ----------------------------------------------------------------------------- helpers


def to_f64(tree):
    """Floating leaves of a pytree (Linen variables or an NNX module) cast to float64."""
    return jax.tree.map(
        lambda a: (
            a.astype(jnp.float64)
            if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)
            else a
        ),
        tree,
    )


def linen_model(n: int = 2, seed: int = 0):
    """(LinenStack(n), float64 variables)."""
    m = LinenStack(n)
    x = jnp.zeros((2, SEQ, IN), jnp.float64)
    return m, to_f64(m.init(jax.random.PRNGKey(seed), x))


def nnx_model(n: int = 2, seed: int = 0):
    """NnxStack(n) with float64 parameters."""
    return to_f64(NnxStack(n, nnx.Rngs(seed)))


def calib(n: int = 8, seed: int = 1):
    """(n, SEQ, IN) float64 calibration inputs."""
    return jax.random.normal(jax.random.PRNGKey(seed), (n, SEQ, IN), jnp.float64)
