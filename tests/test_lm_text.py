"""experiments/lm_text.py (novels, eval and calibration windows) and
experiments/perplexity.py (against a numpy float64 log-softmax of the reference logits)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
from test_llama import _model, numpy_forward

from experiments import lm_text
from experiments.llama import LlamaConfig
from experiments.perplexity import mean_nll, perplexity, window_nll

DATA_DIR = (
    os.environ.get("GPFQ_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data"
)


def _streams(rng) -> dict[str, np.ndarray]:
    """Fake token streams named like the calibration novels, lengths not multiples of 16."""
    return {
        name: rng.integers(0, 1000, 100 + 37 * i) for i, name in enumerate(lm_text.CALIB_NOVELS)
    }


def test_eval_windows():
    tokens = np.arange(1000)
    w = lm_text.eval_windows(tokens, window=64)
    assert w.shape == (15, 64) and w.dtype == np.int32
    np.testing.assert_array_equal(w.reshape(-1), tokens[:960])  # consecutive, no overlap
    assert lm_text.eval_windows(tokens, 64, max_tokens=200).shape == (3, 64)
    with pytest.raises(ValueError, match="make no window"):
        lm_text.eval_windows(tokens[:10], 64)


def test_calibration_windows_seeded_distinct_no_overlap(rng):
    streams = _streams(rng)
    w = lm_text.calibration_windows(streams, n=20, window=16, seed=3)
    assert w.shape == (20, 16) and w.dtype == np.int32
    np.testing.assert_array_equal(w, lm_text.calibration_windows(streams, 20, 16, seed=3))
    assert not np.array_equal(w, lm_text.calibration_windows(streams, 20, 16, seed=4))
    grid = lm_text.window_grid(streams, 16)
    slices = {(n, s): streams[n][s : s + 16].tobytes() for n, s in grid}
    # grid windows are window-aligned in each stream, so distinct ones never overlap
    assert all(s % 16 == 0 and s + 16 <= len(streams[n]) for n, s in grid)
    found = [next(k for k, v in slices.items() if v == row.tobytes()) for row in w.astype(int)]
    assert len(set(found)) == 20
    assert len(grid) == sum(len(t) // 16 for t in streams.values())
    with pytest.raises(ValueError, match="the streams hold"):
        lm_text.calibration_windows(streams, len(grid) + 1, 16, seed=0)


def test_calibration_refuses_the_eval_novel(rng):
    streams = {**_streams(rng), "emma": np.arange(100)}
    with pytest.raises(ValueError, match="evaluation novel 'emma'"):
        lm_text.calibration_windows(streams, 2, 16, seed=0)
    assert lm_text.EVAL_NOVEL not in lm_text.CALIB_NOVELS and len(lm_text.CALIB_NOVELS) == 5


class _Chars:
    """A stand-in tokenizer: one id per character."""

    def encode(self, text: str) -> SimpleNamespace:
        return SimpleNamespace(ids=[ord(c) for c in text])


def test_novels_from_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("GPFQ_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="GPFQ_DATA_DIR"):
        lm_text.load_novel("emma")
    with pytest.raises(FileNotFoundError, match="text/austen"):
        lm_text.load_novel("emma", tmp_path)
    folder = tmp_path / "text" / "austen"
    folder.mkdir(parents=True)
    (folder / "emma.txt").write_text("x" * 10 + "Emma Woodhouse", encoding="utf-8")
    monkeypatch.setenv("GPFQ_DATA_DIR", str(tmp_path))
    ids = lm_text.eval_tokens(_Chars(), start_char=10)  # data dir from $GPFQ_DATA_DIR
    assert "".join(map(chr, ids)) == "Emma Woodhouse"
    with pytest.raises(ValueError, match="unknown novel"):
        lm_text.load_novel("ulysses")


def test_real_novels_are_there():
    if not (Path(DATA_DIR) / "text" / "austen").is_dir():
        pytest.skip(f"Austen text missing under {DATA_DIR} (set GPFQ_DATA_DIR)")
    texts = {name: lm_text.load_novel(name, DATA_DIR) for name in lm_text.NOVELS}
    assert all(len(t) > 400_000 for t in texts.values())
    assert "Emma Woodhouse" in texts["emma"][:5000]


def _log_softmax_nll(logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Per-window NLL sums, float64, from reference logits (n, L, vocab)."""
    z = logits[:, :-1]
    logz = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    picked = np.take_along_axis(z, tokens[:, 1:, None], axis=-1)[..., 0]
    return (logz - picked).sum(-1)


def test_perplexity_matches_numpy(rng):
    cfg = LlamaConfig.tiny(rope_theta=100.0)
    model, variables, tokens = _model(cfg, rng, batch=5, seq=6)
    tokens = np.asarray(tokens)
    want = _log_softmax_nll(numpy_forward(variables["params"], tokens, cfg), tokens)
    for batch_size in (2, 5, 8):  # padded last batches, one batch, a batch over n
        got = window_nll(model, variables, tokens, batch_size)
        assert got.dtype == np.float64 and got.shape == (5,)
        np.testing.assert_allclose(got, want, rtol=1e-4)
    ppl = perplexity(model, variables, tokens, batch_size=2)
    np.testing.assert_allclose(ppl, np.exp(want.sum() / (5 * 5)), rtol=1e-4)
    loss = mean_nll(model, variables, jnp.asarray(tokens))  # the Fisher's loss
    np.testing.assert_allclose(float(loss), want.sum() / (5 * 5), rtol=1e-4)
    with pytest.raises(ValueError, match="L >= 2"):
        window_nll(model, variables, tokens[:, :1])
