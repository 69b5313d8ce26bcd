"""Models the driver cannot quantize: no quantizable layer, shared layers, unsupported kernel
layers (ConvTranspose, ConvLocal, einsums summing a kernel or input axis alone), non-zero
padding, layers inside lifted transforms. Each error names the module path; nothing is left
float silently."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from _faultkit import CALIB, error_cases, expect_error, fault, normal, qp
from flax import nnx

from gpfq_jax.flax.tracing import ModelStructureError

IMAGES = normal((4, 6, 6, 2), seed=7)
R = nnx.Rngs


def linen(module: nn.Module, x=CALIB):
    return lambda: qp(module, module.init(jax.random.PRNGKey(0), x[:1]), x)


def nnx_(make, x=CALIB):
    return lambda: qp(make(), None, x)


class NoLayer(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(x) * self.param("s", nn.initializers.ones, (x.shape[-1],))


class Shared(nn.Module):
    @nn.compact
    def __call__(self, x):
        d = nn.Dense(6)
        return d(nn.relu(d(x)))


class SharedGeneral(nn.Module):
    @nn.compact
    def __call__(self, x):
        d = nn.DenseGeneral(6)
        return d(nn.relu(d(x)))


class WithConvTranspose(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.ConvTranspose(3, (3, 3))(nn.Conv(4, (3, 3))(x))


class WithEinsum(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Einsum((6, 3, 2), "bi,ioz->bo")(x)  # kernel axis z summed over alone


class WithConvLocal(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.ConvLocal(3, (3, 3))(x)


class Padded(nn.Module):
    padding: str = "CIRCULAR"

    @nn.compact
    def __call__(self, x):
        y = nn.Conv(4, (3, 3))(x)  # Conv_0 (zero padding), then Conv_1
        return nn.Conv(3, (3, 3), padding=self.padding)(y)


class Remat(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.remat(nn.Dense)(3)(nn.Dense(6)(x))


class Vmapped(nn.Module):
    @nn.compact
    def __call__(self, x):
        dense = nn.vmap(
            nn.Dense, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=0
        )  # fmt: skip
        return dense(3)(jnp.stack([x, x]))


class MaskedConv(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Conv(3, (3, 3), mask=jnp.ones((3, 3, 2, 3)))(x)


class NNoLayer(nnx.Module):
    def __init__(self, rngs):
        self.s = nnx.Param(jnp.ones(6))

    def __call__(self, x):
        return x * self.s[...]


class NShared(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(6, 6, rngs=rngs)

    def __call__(self, x):
        return self.lin(nnx.relu(self.lin(x)))


class NOne(nnx.Module):
    """One layer ``self.layer`` built by ``make(rngs)``, called on x."""

    def __init__(self, make, rngs):
        self.layer = make(rngs)

    def __call__(self, x):
        return self.layer(x)


class NRemat(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        return nnx.remat(lambda m, x: m(x))(self.lin, x)


UNSUPPORTED = r"unsupported layer\(s\) in the forward pass: '{}' \({}\); supported layers: Dense"
LIFTED = r"layer '{}' is called inside a lifted transform \(nn\.scan / nn\.vmap / nn\.remat"
NO_LAYER = r"the model has no quantizable layer \(Dense / nnx\.Linear / Conv / nnx\.Conv\)"
SHARED = (r"shared layer '{}' called 2 times is not supported: each quantizable layer must be "
          r"called exactly once per forward pass")  # fmt: skip
PAD = r"conv layer '{}' uses padding='{}', which pads the input before the convolution"

CASES = error_cases(
    ("linen-no-layer", linen(NoLayer()), ValueError, NO_LAYER),
    ("nnx-no-layer", nnx_(lambda: NNoLayer(R(0))), ValueError, NO_LAYER),
    ("linen-shared-layer", linen(Shared()), ModelStructureError, SHARED.format("Dense_0")),
    ("nnx-shared-layer", nnx_(lambda: NShared(R(0))), ModelStructureError, SHARED.format("lin")),
    ("linen-shared-DenseGeneral", linen(SharedGeneral()), ModelStructureError,
     SHARED.format("DenseGeneral_0")),
    ("nnx-Einsum-input-axis-summed",
     nnx_(lambda: NOne(lambda r: nnx.Einsum("bi,io->o", (6, 3), rngs=r), R(0))),
     NotImplementedError, r"layer 'layer': input axis 'b' is summed over alone"),
    ("linen-ConvTranspose", linen(WithConvTranspose(), IMAGES), NotImplementedError,
     UNSUPPORTED.format("ConvTranspose_0", "ConvTranspose")),
    ("nnx-ConvTranspose",
     nnx_(lambda: NOne(lambda r: nnx.ConvTranspose(2, 3, (3, 3), rngs=r), R(0)), IMAGES),
     NotImplementedError, UNSUPPORTED.format("layer", "ConvTranspose")),
    ("linen-Einsum-kernel-axis-summed", linen(WithEinsum()), NotImplementedError,
     r"layer 'Einsum_0': kernel axis 'z' is summed over alone"),
    ("linen-ConvLocal", linen(WithConvLocal(), IMAGES), NotImplementedError,
     UNSUPPORTED.format("ConvLocal_0", "ConvLocal")),
    ("linen-CIRCULAR-padding", linen(Padded("CIRCULAR"), IMAGES), NotImplementedError,
     PAD.format("Conv_1", "CIRCULAR")),
    ("linen-REFLECT-padding", linen(Padded("REFLECT"), IMAGES), NotImplementedError,
     PAD.format("Conv_1", "REFLECT")),
    ("nnx-CIRCULAR-padding",
     nnx_(lambda: NOne(lambda r: nnx.Conv(2, 3, (3, 3), padding="CIRCULAR", rngs=r), R(0)),
          IMAGES), NotImplementedError, PAD.format("layer", "CIRCULAR")),
    ("linen-remat", linen(Remat()), NotImplementedError, LIFTED.format("CheckpointDense_0")),
    ("nnx-remat", nnx_(lambda: NRemat(R(0))), NotImplementedError, LIFTED.format("lin")),
    ("linen-vmap", linen(Vmapped()), NotImplementedError, LIFTED.format("VmapDense_0")),
    ("linen-masked-conv", linen(MaskedConv(), IMAGES), NotImplementedError,
     r"masked conv layer 'Conv_0' is not supported"),
    ("linen-shared-layer-blames-input-shape", linen(Shared()), ModelStructureError,
     r"^shared layer 'Dense_0' called 2 times"),
)  # fmt: skip


@fault("models")
@pytest.mark.parametrize("call, exc, pattern", CASES)
def test_unsupported_models(call, exc, pattern):
    expect_error(call, exc, pattern)
