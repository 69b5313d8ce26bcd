"""Running a model one block at a time from cached block inputs (the frontier).

For every calibration batch the frontier holds the arguments of the next block's call twice:
from the float model ("float" stream: X) and from the partially quantized one ("quant"
stream: X~). A layer inside block k is captured by running block k alone on those arguments
(``Frontier.inputs``); when every layer of block k is quantized, block k's float and quantized
outputs become block k+1's hidden state (``Frontier.advance``). Forward work is one block per
layer plus one per block, instead of the whole prefix per layer, so it grows linearly with
depth. Blocks with the same module and call share one compiled function.

The first block's arguments come from one run of the whole model up to it (``Frontier.enter``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
from flax import nnx

from gpfq_jax.flax.activation_cache import ActivationCache
from gpfq_jax.flax.blocks import Block
from gpfq_jax.flax.capture import count_trace, layer_input, output_and_layer_inputs
from gpfq_jax.flax.intercept import intercepted_forward, is_nnx
from gpfq_jax.flax.targets import Target
from gpfq_jax.flax.tracing import LayerInfo

Pair = tuple[jax.Array, jax.Array]


def _key(*parts: Any) -> Any:
    """A cache key for identical blocks (hashable parts), else one that is never shared."""
    try:
        hash(parts)
        return parts
    except TypeError:
        return tuple(id(p) for p in parts)


class BlockFunctions:
    """Jitted functions of blocks: apply a block, capture a layer's input inside it, and
    capture a block's arguments from the whole model. One function per distinct (block
    module or NNX graph, call template, layer) so identical blocks compile once."""

    def __init__(self, target: Target):
        self.target = target
        self._fns: dict[Any, Callable] = {}

    def _module(self, block: Block) -> tuple[Any, Any]:
        """(Linen unbound module, None) or (None, NNX graphdef) of the block."""
        if block.module is not None:
            return block.module, None
        return None, self.target.block_graphdef(block.path)

    def _cached(self, key: Any, build: Callable[[], Callable]) -> Callable:
        if key not in self._fns:
            self._fns[key] = jax.jit(build())
        return self._fns[key]

    def apply(self, block: Block) -> Callable:
        """``f(block_vars, leaves) -> the block's output`` (leaves: its array arguments)."""
        module, graphdef = self._module(block)
        template = block.template

        def build():
            def f(variables, leaves):
                count_trace()
                args, kwargs = template.rebuild(leaves)
                if graphdef is None:
                    return module.apply(variables, *args, **kwargs)
                return nnx.merge(graphdef, variables)(*args, **kwargs)

            return f

        return self._cached(_key("apply", module, graphdef, template), build)

    def capture(self, block: Block, layer: LayerInfo) -> Callable:
        """``f(block_vars, leaves) -> the input of layer`` (a layer inside ``block``)."""
        module, graphdef = self._module(block)
        template, rel = block.template, layer.path[len(block.path) :]

        def build():
            def f(variables, leaves):
                args, kwargs = template.rebuild(leaves)
                return layer_input(module, graphdef, variables, args, kwargs, rel, layer.kind)

            return f

        return self._cached(_key("capture", module, graphdef, template, rel, layer.kind), build)

    def float_pass(self, block: Block, layers: Sequence[LayerInfo]) -> Callable:
        """``f(block_vars, leaves) -> (the block's output, [the input of each layer])``."""
        module, graphdef = self._module(block)
        template = block.template
        wanted = tuple((layer.path[len(block.path) :], layer.kind) for layer in layers)

        def build():
            def f(variables, leaves):
                args, kwargs = template.rebuild(leaves)
                return output_and_layer_inputs(module, graphdef, variables, args, kwargs, wanted)

            return f

        return self._cached(_key("float_pass", module, graphdef, template, wanted), build)

    def arguments(self, block: Block) -> Callable:
        """``f(model_vars, batch) -> [array arguments of the block's call]`` (whole model)."""
        target, template = self.target, block.template
        graphdef = nnx.graphdef(target.model) if is_nnx(target.model) else None

        def build():
            def f(variables, batch):
                count_trace()
                box = []

                def hook(module, path, kind, args, kwargs, call):
                    if kind == "block" and not box:
                        box.append((args, kwargs))
                    return call()

                intercepted_forward(target.model, graphdef, variables, (batch,), target.kwargs,
                                    hook, watch=frozenset({block.path}))  # fmt: skip
                leaves = jax.tree.leaves(box[0], is_leaf=lambda a: a is None)
                return [leaves[i] for i in template.arrays]

            return f

        return self._cached(("arguments", block.path), build)


class Frontier:
    """The cached block arguments of both streams, and how to move them one block on."""

    def __init__(self, fns: BlockFunctions, cache: ActivationCache):
        self.fns, self.cache = fns, cache
        self.batches = 0
        self.count = 0  # array arguments per block call
        self.block: Block | None = None  # the block whose arguments are cached
        self.seconds = 0.0  # forward time spent entering, advancing and in float passes
        self._float_layers: list | None = None  # layers whose float inputs are cached

    def enter(self, block: Block, batches: Any, changed: bool) -> None:
        """Cache ``block``'s arguments for every batch from whole-model runs."""
        t0 = time.perf_counter()
        f, target = self.fns.arguments(block), self.fns.target
        n = 0
        for i, b in enumerate(batches):
            leaves_f = f(target.float_arg, b)
            leaves_q = f(target.quant_arg, b) if changed else leaves_f
            for j, (a, aq) in enumerate(zip(leaves_f, leaves_q)):
                self.cache.put("float", i, j, a)
                if aq is not a:
                    self.cache.put("quant", i, j, aq)
            n = i + 1
        self.batches, self.count, self.block = n, len(block.template.arrays), block
        self.cache.drop_streams(("float_in", "float_out"))
        self._float_layers = None
        self.seconds += time.perf_counter() - t0

    def _float_pass(self, block: Block, layers: Sequence[LayerInfo]) -> None:
        """One float run of ``block`` per batch, caching its output ("float_out") and the
        inputs of ``layers`` ("float_in", leaf = position in ``layers``)."""
        t0 = time.perf_counter()
        f = self.fns.float_pass(block, layers)
        vf = self.fns.target.block_vars(block.path, quant=False)
        for i in range(self.batches):
            out, xs = f(vf, self.cache.leaves("float", i, self.count))
            self.cache.put("float_out", i, 0, out)
            for j, x in enumerate(xs):
                self.cache.put("float_in", i, j, x)
        self._float_layers = [layer.path for layer in layers]
        self.seconds += time.perf_counter() - t0

    def inputs(
        self,
        block: Block,
        layer: LayerInfo,
        changed: bool,
        captured: Sequence[LayerInfo] = (),
    ) -> Iterator[Pair]:
        """(float input, quantized-model input) of ``layer`` for every batch (the second is
        the first itself while nothing has been quantized).

        ``captured``: every layer of ``block`` whose inputs will be asked for. With more than
        one, the float inputs of all of them (and the block's float output, used by
        ``advance``) come from one float run of the block, made at the first request; only the
        quantized stream is run per layer."""
        f = self.fns.capture(block, layer)
        vq = self.fns.target.block_vars(block.path, quant=True) if changed else None
        paths = [c.path for c in captured]
        if len(paths) > 1 and layer.path in paths and self._float_layers != paths:
            self._float_pass(block, captured)
        cached = self._float_layers is not None and layer.path in self._float_layers
        vf = None if cached else self.fns.target.block_vars(block.path, quant=False)
        for i in range(self.batches):
            if cached:
                x = self.cache.get("float_in", i, self._float_layers.index(layer.path))
            else:
                x = f(vf, self.cache.leaves("float", i, self.count))
            yield x, (f(vq, self.cache.leaves("quant", i, self.count)) if changed else x)

    def advance(self, block: Block, changed: bool, next_block: Block | None) -> None:
        """Replace the cached hidden state by ``block``'s outputs (both streams); the other
        arguments stay (they are the same for every block of a chain)."""
        t0 = time.perf_counter()
        f = self.fns.apply(block)
        vf = self.fns.target.block_vars(block.path, quant=False)
        vq = self.fns.target.block_vars(block.path, quant=True) if changed else vf
        ran = self._float_layers is not None  # the float output is cached
        for i in range(self.batches):
            if ran:
                out_f = self.cache.get("float_out", i, 0)
            else:
                out_f = f(vf, self.cache.leaves("float", i, self.count))
            out_q = f(vq, self.cache.leaves("quant", i, self.count)) if changed else out_f
            self.cache.put("float", i, 0, out_f)
            if changed:
                self.cache.put("quant", i, 0, out_q)
        self.cache.drop_streams(("float_in", "float_out"))
        self._float_layers = None
        self.block = next_block
        self.seconds += time.perf_counter() - t0


__all__ = ["BlockFunctions", "Frontier"]
