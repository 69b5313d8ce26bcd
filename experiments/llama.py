"""A Llama-architecture decoder in Flax Linen (the SmolLM2-135M shape; random or ported weights).

Layout (Flax kernels are (in, ..., out)):

- ``embed``: ``nn.Embed`` table (vocab, d_model).
- ``layers_{i}`` (i < n_layers), each a :class:`Block` taking and returning the hidden state
  (batch, seq, d_model):
  - ``attn_norm`` (RMSNorm, scale (d_model,)), then ``attn`` (:class:`Attention`):
    ``q_proj`` kernel (d_model, n_heads, head_dim), ``k_proj`` / ``v_proj`` kernels
    (d_model, n_kv_heads, head_dim), ``o_proj`` kernel (n_heads, head_dim, d_model); all
    ``nn.DenseGeneral`` without bias, as Flax's own attention writes its projections;
  - ``mlp_norm`` (RMSNorm), then ``mlp`` (:class:`MLP`, SwiGLU): ``gate_proj`` / ``up_proj``
    kernels (d_model, mlp_dim), ``down_proj`` (mlp_dim, d_model), ``nn.Dense`` without bias.
- ``final_norm`` (RMSNorm), then the logits: ``embed.attend`` when the embeddings are tied,
  else ``lm_head`` (``nn.Dense`` without bias, kernel (d_model, vocab)).

RoPE is the interleaved-pair form (see :func:`apply_rope`), the form llama.cpp's GGUF files
use. Hugging Face checkpoints use the rotate-half form; porting their q/k projections here
needs the same row permutation llama.cpp's converter applies (pairs (j, j + head_dim / 2) of
each head become pairs (2i, 2i + 1)).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The shape of a Llama decoder.

    ``n_heads`` must be a multiple of ``n_kv_heads`` (grouped-query attention: each key/value
    head serves ``n_heads // n_kv_heads`` consecutive query heads) and ``head_dim`` even
    (RoPE rotates pairs).
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_dim: int
    rms_eps: float = 1e-5
    rope_theta: float = 1e5
    tie_embeddings: bool = True
    dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (RoPE rotates pairs), got {self.head_dim}")

    @classmethod
    def smollm2_135m(cls, **overrides: Any) -> LlamaConfig:
        """SmolLM2-135M: 30 layers, d_model 576, 9 heads (3 kv), mlp 1536, tied (~134.5M)."""
        shape = dict(
            vocab_size=49152,
            d_model=576,
            n_layers=30,
            n_heads=9,
            n_kv_heads=3,
            head_dim=64,
            mlp_dim=1536,
            rms_eps=1e-5,
            rope_theta=1e5,
            tie_embeddings=True,
        )
        return cls(**{**shape, **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> LlamaConfig:
        """A tiny shape for tests: vocab 50, d 16, 2 layers, 4 heads (2 kv) of 4, mlp 24."""
        shape = dict(
            vocab_size=50, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4, mlp_dim=24
        )
        return cls(**{**shape, **overrides})


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding, interleaved-pair form.

    Elements 2i and 2i + 1 of every head vector are rotated together by the angle
    ``pos * theta ** (-2i / head_dim)``:
    ``(a, b) -> (a cos - b sin, a sin + b cos)``.

    Args:
      x: (batch, seq, heads, head_dim), head_dim even.
      positions: (batch, seq) integer positions.
      theta: the RoPE base.
    Returns:
      an array shaped and typed like ``x``.
    """
    head_dim = x.shape[-1]
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angle = positions.astype(jnp.float32)[:, :, None, None] * inv_freq  # (b, s, 1, hd/2)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], head_dim // 2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


class Attention(nn.Module):
    """Causal grouped-query self-attention with RoPE.

    ``x`` (batch, seq, d_model) and ``positions`` (batch, seq) -> (batch, seq, d_model). Key
    position t is visible from query position s when positions[t] <= positions[s]. Scores
    scaled by 1 / sqrt(head_dim); softmax in float32.
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        c = self.config
        proj = lambda heads, name: nn.DenseGeneral(  # noqa: E731
            (heads, c.head_dim), use_bias=False, dtype=c.dtype, name=name
        )
        q = apply_rope(proj(c.n_heads, "q_proj")(x), positions, c.rope_theta)
        k = apply_rope(proj(c.n_kv_heads, "k_proj")(x), positions, c.rope_theta)
        v = proj(c.n_kv_heads, "v_proj")(x)
        batch, seq = x.shape[:2]
        group = c.n_heads // c.n_kv_heads
        # query head h = j * group + r uses key/value head j
        q = q.reshape(batch, seq, c.n_kv_heads, group, c.head_dim)
        scores = jnp.einsum("bsjrd,btjd->bjrst", q, k, preferred_element_type=jnp.float32)
        scores = scores.astype(jnp.float32) / jnp.sqrt(jnp.float32(c.head_dim))
        causal = positions[:, None, :] <= positions[:, :, None]  # (b, s, t)
        scores = jnp.where(causal[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bjrst,btjd->bsjrd", probs, v).reshape(batch, seq, c.n_heads, -1)
        return nn.DenseGeneral(
            c.d_model, axis=(-2, -1), use_bias=False, dtype=c.dtype, name="o_proj"
        )(out)


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``, (batch, seq, d_model) -> same shape."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=c.dtype, name=name)  # noqa: E731
        h = nn.silu(dense(c.mlp_dim, "gate_proj")(x)) * dense(c.mlp_dim, "up_proj")(x)
        return dense(c.d_model, "down_proj")(h)


class Block(nn.Module):
    """One pre-norm decoder layer: ``x + attn(norm(x))``, then ``h + mlp(norm(h))``.

    ``x`` (batch, seq, d_model), ``positions`` (batch, seq) -> the new hidden state, same shape.
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        c = self.config
        norm = lambda name: nn.RMSNorm(epsilon=c.rms_eps, dtype=c.dtype, name=name)  # noqa: E731
        h = x + Attention(c, name="attn")(norm("attn_norm")(x), positions)
        return h + MLP(c, name="mlp")(norm("mlp_norm")(h))


class Llama(nn.Module):
    """The decoder: int tokens (batch, seq) -> float32 logits (batch, seq, vocab).

    Positions are 0..seq-1 for every sequence, computed once here and passed to every block.
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        c = self.config
        embed = nn.Embed(c.vocab_size, c.d_model, dtype=c.dtype, name="embed")
        h = embed(tokens)
        batch, seq = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
        for i in range(c.n_layers):
            h = Block(c, name=f"layers_{i}")(h, positions)
        h = nn.RMSNorm(epsilon=c.rms_eps, dtype=c.dtype, name="final_norm")(h)
        if c.tie_embeddings:
            logits = embed.attend(h)
        else:
            logits = nn.Dense(c.vocab_size, use_bias=False, dtype=c.dtype, name="lm_head")(h)
        return logits.astype(jnp.float32)


def param_count(config: LlamaConfig) -> int:
    """Number of parameters of ``Llama(config)``, from shapes only (nothing allocated)."""
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    shapes = jax.eval_shape(Llama(config).init, jax.random.PRNGKey(0), tokens)
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(shapes))
