"""experiments/llama.py: the Flax Llama against an independent numpy float64 forward pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.llama import Llama, LlamaConfig, apply_rope, param_count


def _rms_norm(x: np.ndarray, scale: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope(v: np.ndarray, pos: int, theta: float) -> np.ndarray:
    """One head vector (head_dim,) at position ``pos``: pair (2i, 2i+1) rotated by
    pos * theta^(-2i/head_dim)."""
    d = v.shape[0]
    out = np.empty_like(v)
    for i in range(d // 2):
        angle = pos * theta ** (-2 * i / d)
        c, s = np.cos(angle), np.sin(angle)
        a, b = v[2 * i], v[2 * i + 1]
        out[2 * i] = a * c - b * s
        out[2 * i + 1] = a * s + b * c
    return out


def _attention(x: np.ndarray, p: dict, cfg: LlamaConfig) -> np.ndarray:
    """x (seq, d) of one sequence; loops over heads and positions."""
    seq = x.shape[0]
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    wq, wk, wv, wo = (np.asarray(p[n]["kernel"], np.float64) for n in names)
    group = cfg.n_heads // cfg.n_kv_heads
    heads = np.zeros((seq, cfg.n_heads, cfg.head_dim))
    for h in range(cfg.n_heads):
        kv = h // group
        q = np.stack([_rope(x[s] @ wq[:, h, :], s, cfg.rope_theta) for s in range(seq)])
        k = np.stack([_rope(x[t] @ wk[:, kv, :], t, cfg.rope_theta) for t in range(seq)])
        v = x @ wv[:, kv, :]
        for s in range(seq):
            scores = np.array([q[s] @ k[t] for t in range(s + 1)]) / np.sqrt(cfg.head_dim)
            w = np.exp(scores - scores.max())
            heads[s, h] = (w / w.sum()) @ v[: s + 1]
    return np.einsum("shd,hdo->so", heads, wo)


def _silu(z: np.ndarray) -> np.ndarray:
    return z / (1 + np.exp(-z))


def numpy_forward(params: dict, tokens: np.ndarray, cfg: LlamaConfig) -> np.ndarray:
    """Logits (batch, seq, vocab) in float64, one sequence at a time."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    table = p["embed"]["embedding"]
    out = []
    for seq_tokens in tokens:
        x = table[seq_tokens]
        for i in range(cfg.n_layers):
            blk = p[f"layers_{i}"]
            h = _rms_norm(x, blk["attn_norm"]["scale"], cfg.rms_eps)
            x = x + _attention(h, blk["attn"], cfg)
            m, h = blk["mlp"], _rms_norm(x, blk["mlp_norm"]["scale"], cfg.rms_eps)
            up = _silu(h @ m["gate_proj"]["kernel"]) * (h @ m["up_proj"]["kernel"])
            x = x + up @ m["down_proj"]["kernel"]
        x = _rms_norm(x, p["final_norm"]["scale"], cfg.rms_eps)
        head = table.T if cfg.tie_embeddings else p["lm_head"]["kernel"]
        out.append(x @ head)
    return np.stack(out)


def _randomize(params: dict, rng: np.random.Generator) -> dict:
    """Every leaf redrawn (norm scales around 1, so that a wrong norm is visible)."""

    def draw(path, a):
        if path[-1].key == "scale":
            return jnp.asarray(1 + 0.3 * rng.standard_normal(a.shape), jnp.float32)
        return jnp.asarray(0.4 * rng.standard_normal(a.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, params)


def _model(cfg: LlamaConfig, rng: np.random.Generator, batch: int = 2, seq: int = 7):
    model = Llama(cfg)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, seq)), jnp.int32)
    params = _randomize(model.init(jax.random.PRNGKey(0), tokens)["params"], rng)
    return model, {"params": params}, tokens


@pytest.mark.parametrize("tied", [True, False])
def test_logits_match_numpy_reference(rng, tied):
    cfg = LlamaConfig.tiny(tie_embeddings=tied, rope_theta=100.0)
    model, variables, tokens = _model(cfg, rng)
    assert ("lm_head" in variables["params"]) is not tied
    logits = model.apply(variables, tokens)
    assert logits.shape == (2, 7, cfg.vocab_size) and logits.dtype == jnp.float32
    want = numpy_forward(variables["params"], np.asarray(tokens), cfg)
    np.testing.assert_allclose(np.asarray(logits), want, rtol=1e-4, atol=1e-4)


def test_kernel_layouts(rng):
    cfg = LlamaConfig.tiny(tie_embeddings=False)
    _, variables, _ = _model(cfg, rng)
    p = variables["params"]
    attn, mlp = p["layers_1"]["attn"], p["layers_1"]["mlp"]
    assert attn["q_proj"]["kernel"].shape == (16, 4, 4)
    assert attn["k_proj"]["kernel"].shape == attn["v_proj"]["kernel"].shape == (16, 2, 4)
    assert attn["o_proj"]["kernel"].shape == (4, 4, 16)
    assert mlp["gate_proj"]["kernel"].shape == mlp["up_proj"]["kernel"].shape == (16, 24)
    assert mlp["down_proj"]["kernel"].shape == (24, 16)
    assert p["embed"]["embedding"].shape == (50, 16) and p["lm_head"]["kernel"].shape == (16, 50)
    assert set(p) == {"embed", "layers_0", "layers_1", "final_norm", "lm_head"}


def test_causal(rng):
    cfg = LlamaConfig.tiny()
    model, variables, tokens = _model(cfg, rng, batch=1, seq=9)
    base = np.asarray(model.apply(variables, tokens))
    for t in (0, 4, 8):
        changed = tokens.at[0, t].set((tokens[0, t] + 1) % cfg.vocab_size)
        out = np.asarray(model.apply(variables, changed))
        np.testing.assert_array_equal(out[:, :t], base[:, :t])
        assert not np.allclose(out[:, t], base[:, t])


def test_rope_pairs_and_position_zero(rng):
    x = jnp.asarray(rng.standard_normal((1, 3, 2, 6)), jnp.float32)
    pos = jnp.asarray([[0, 1, 5]])
    y = np.asarray(apply_rope(x, pos, 10.0))
    np.testing.assert_allclose(y[0, 0], np.asarray(x[0, 0]), rtol=1e-6)  # position 0: identity
    pair_norms = lambda a: np.linalg.norm(a.reshape(*a.shape[:-1], -1, 2), axis=-1)  # noqa: E731
    np.testing.assert_allclose(pair_norms(y), pair_norms(np.asarray(x)), rtol=1e-5)
    want = _rope(np.asarray(x[0, 2, 1], np.float64), 5, 10.0)
    np.testing.assert_allclose(y[0, 2, 1], want, rtol=1e-5, atol=1e-6)


def test_smollm2_parameter_count():
    cfg = LlamaConfig.smollm2_135m()
    n = param_count(cfg)
    assert abs(n - 134.5e6) <= 0.2e6, n
    assert n == 134_515_008  # 49152*576 + 30 * 3,540,096 + 576
