"""What ``quantize_params`` returns: one LayerRecord per layer inside a QuantizeResult."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from gpfq_jax.core.layer import LayerResult
from gpfq_jax.flax.paths import Path


@dataclasses.dataclass
class LayerRecord:
    """One quantized layer of a model: where it is, its LayerResult, and what it cost.

    path: module path (Linen: in ``variables['params']``; NNX: attribute path); name: "/".join.
    kind: "dense", "conv", "dense_general" or "einsum"; shape: the kernel shape (Flax layout).
    result: the one-layer LayerResult (codes, step, rel_error, spec, method, c, offset);
      its fields are readable on the record too (``record.codes``, ``record.scale``, ...).
    seconds = capture_seconds (forward passes, incl. compilation) + stats_seconds
    (accumulating H, G, F) + quant_seconds (quantize_from_stats).
    capture_first_seconds: the first batch's share of capture_seconds (includes compiling the
    layer's capture function). rows: calibration rows accumulated (samples for Dense, patches
    for Conv). bias_shift: (cout,) added to the bias by bias correction, else None.
    block: the name of the block it was quantized in by the frontier driver (None: from
    whole-model runs). shares_stats_with: the name of the layer whose statistics it reused
    (it reads the same tensor), None when it accumulated its own.
    """

    path: Path
    name: str
    kind: str
    shape: tuple[int, ...]
    result: LayerResult
    capture_seconds: float = 0.0
    stats_seconds: float = 0.0
    quant_seconds: float = 0.0
    capture_first_seconds: float = 0.0
    rows: int = 0
    bias_shift: jax.Array | None = None
    block: str | None = None
    shares_stats_with: str | None = None

    # The LayerResult's fields, read through.
    codes = property(lambda self: self.result.codes, doc="integer codes, shape ``shape``")
    scale = property(lambda self: self.result.step, doc="the step, (cout,) or ()")
    rel_error = property(lambda self: self.result.rel_error)
    spec = property(lambda self: self.result.spec)
    method = property(lambda self: self.result.method)
    c = property(lambda self: self.result.c)
    offset = property(lambda self: self.result.offset)
    levels = property(lambda self: self.result.levels)
    storage_bits = property(lambda self: self.result.storage_bits)

    @property
    def seconds(self) -> float:
        return self.capture_seconds + self.stats_seconds + self.quant_seconds

    def summary(self) -> dict:
        return {
            "layer": self.name,
            "kind": self.kind,
            "shape": list(self.shape),
            **self.result.summary(),
            "rows": self.rows,
            "bias_corrected": self.bias_shift is not None,
            "block": self.block,
            "shares_stats_with": self.shares_stats_with,
            "seconds": self.seconds,
            "capture_seconds": self.capture_seconds,
            "capture_first_seconds": self.capture_first_seconds,
            "stats_seconds": self.stats_seconds,
            "quant_seconds": self.quant_seconds,
        }


_TABLE = (
    ("layer", "{}"),
    ("kind", "{}"),
    ("shape", "{}"),
    ("bits", "{}"),
    ("grid", "{}"),
    ("group_size", "{}"),
    ("method", "{}"),
    ("levels", "{}"),
    ("rel_error", "{:.4f}"),
    ("capture_s", "{:.3f}"),
    ("stats_s", "{:.3f}"),
    ("quant_s", "{:.3f}"),
    ("shared_with", "{}"),
)


class SummaryTable(list):
    """A list of per-layer dicts that prints as an aligned table."""

    def __str__(self) -> str:
        if not self:
            return "(no quantized layers)"
        key = {
            "shared_with": "shares_stats_with",
            "capture_s": "capture_seconds",
            "stats_s": "stats_seconds",
            "quant_s": "quant_seconds",
        }
        rows = [
            [
                "-"
                if d[key.get(h, h)] is None
                else fmt.format(d[key.get(h, h)])
                if not isinstance(d[key.get(h, h)], list)
                else "x".join(map(str, d[key.get(h, h)]))
                for h, fmt in _TABLE
            ]
            for d in self
        ]
        heads = [h for h, _ in _TABLE]
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
        return "\n".join([line(heads), line(["-" * w for w in widths]), *map(line, rows)])


@dataclasses.dataclass
class DriverReport:
    """How ``quantize_params`` ran.

    mode: "frontier" (blocks run one at a time from cached block inputs) or "reference"
    (every layer's inputs from whole-model runs). blocks: the block names, forward order.
    note: what block detection found (or why there are no blocks). shared: groups of layers
    quantized from one accumulation of statistics (they read the same tensor).
    traced_functions: capture / block functions traced (compiled) during the run.
    frontier_seconds: forward time spent moving the frontier (block inputs and outputs).
    cache_peak_bytes / spilled_bytes: the frontier cache's largest host memory and disk use.
    resumed_layers: layers taken from ``resume_dir`` instead of quantized in this call.
    """

    mode: str = "reference"
    blocks: list[str] = dataclasses.field(default_factory=list)
    note: str = ""
    shared: list[list[str]] = dataclasses.field(default_factory=list)
    traced_functions: int = 0
    frontier_seconds: float = 0.0
    cache_peak_bytes: int = 0
    spilled_bytes: int = 0
    resumed_layers: int = 0


@dataclasses.dataclass
class QuantizeResult:
    """What ``quantize_params`` returns.

    variables: Linen: the variables tree with quantized kernels replaced by their dequantized
      values (drop-in for ``model.apply``). NNX: ``nnx.to_pure_dict(nnx.state(model))`` of
      the quantized copy.
    model: NNX: the quantized copy (the user's model is untouched); Linen: None.
    layers: one LayerRecord per quantized layer, forward order.
    skipped: names of the layers left float by rules. folded: (layer, batchnorm) name pairs.
    driver: how the run went (blocks, shared statistics, compilations, cache); DriverReport.
    bit_allocation: with ``budget_bits``, the per-layer bit widths chosen and why
      (``gpfq_jax.flax.bit_allocation.BitAllocation``); None otherwise.
    """

    variables: Any
    model: Any
    layers: list[LayerRecord]
    skipped: list[str]
    folded: list[tuple[str, str]]
    framework: str
    seconds: float = 0.0
    driver: DriverReport = dataclasses.field(default_factory=DriverReport)
    bit_allocation: Any = None

    def summary(self) -> SummaryTable:
        """Per-layer dicts; ``print(res.summary())`` shows a table."""
        return SummaryTable(r.summary() for r in self.layers)

    def __getitem__(self, name: str) -> LayerRecord:
        for r in self.layers:
            if r.name == name:
                return r
        raise KeyError(
            f"no quantized layer {name!r}; layers: {', '.join(r.name for r in self.layers)}"
        )


__all__ = ["LayerRecord", "DriverReport", "QuantizeResult", "SummaryTable"]
