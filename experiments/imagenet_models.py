"""ImageNet-shape Flax Linen models (torchvision layouts) for whole-model scale tests.

``ResNet18`` / ``ResNet50`` (torchvision ``resnet18`` / ``resnet50``, v1.5: stride on the 3x3
conv of bottlenecks) and ``VGG16`` (configuration D, torchvision ``vgg16`` / ``vgg16_bn``).
Layers are plain ``nn.Conv`` / ``nn.Dense`` / ``nn.BatchNorm`` so the quantizer can intercept
them. Kernels use Flax layouts: Conv ``(kh, kw, cin, cout)``, Dense ``(in, out)``. Inputs are
NHWC float images ``(B, H, W, 3)``, ImageNet-normalized; outputs are logits ``(B, 1000)``.
BatchNorm uses running averages and dropout is deterministic when ``train=False``.

Parameter counts equal torchvision's: ResNet-18 11,689,512, ResNet-50 25,557,032,
VGG-16 138,357,544. Module names follow torchvision's state-dict keys (``conv1``, ``bn1``,
``layer1_0/conv1``, ``layer2_0/downsample_conv``, ``fc``; ``features_0``, ``classifier_6``)
so a user's weight converter maps names one to one. No pretrained weights are shipped.

ResNets accept any input size >= 32 (global average pool); VGG-16 applies torchvision's
adaptive average pool to 7x7 (exact for 224 inputs, where it is the identity).

Importing this module registers "resnet18", "resnet50" and "vgg16" in
``experiments.models.MODELS``, so ``experiments.models.create_model`` finds them afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments import models as _models
from gpfq_jax.flax.intercept import intercepted_forward

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "ResNet18",
    "ResNet50",
    "VGG16",
    "adaptive_avg_pool",
    "IMAGENET_MODELS",
    "create_imagenet_model",
    "synthetic_images",
    "init_variables",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision initializers: convs kaiming_normal(fan_out, relu); VGG linears N(0, 0.01).
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_vgg_dense_init = nn.initializers.normal(0.01)


def _bn(train: bool, name: str) -> nn.BatchNorm:
    """torchvision BatchNorm2d (momentum 0.1 = Flax 0.9, eps 1e-5), as in the CIFAR models."""
    return _models._bn(train, name=name)


def _conv(features: int, kernel: int, strides: int, name: str, bias: bool = False) -> nn.Conv:
    pad = (kernel - 1) // 2  # torchvision's symmetric padding (3 for 7x7, 1 for 3x3, 0 for 1x1)
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(strides, strides),
        padding=((pad, pad), (pad, pad)),
        use_bias=bias,
        kernel_init=_conv_init,
        name=name,
    )


class BasicBlock(nn.Module):
    """torchvision BasicBlock: conv3x3(stride)-BN-ReLU-conv3x3-BN (+ shortcut) -> ReLU.

    Shortcut: identity, or ``downsample_conv`` (1x1, stride) + ``downsample_bn`` when the
    stride or channel count changes. ``(B, H, W, Cin) -> (B, H/s, W/s, features)``.
    """

    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        y = _conv(self.features, 3, self.strides, "conv1")(x)
        y = nn.relu(_bn(train, "bn1")(y))
        y = _conv(self.features, 3, 1, "conv2")(y)
        y = _bn(train, "bn2")(y)
        return nn.relu(_shortcut(x, self.features, self.strides, train) + y)


class Bottleneck(nn.Module):
    """torchvision Bottleneck (v1.5): conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1(4x)-BN
    (+ shortcut) -> ReLU. ``(B, H, W, Cin) -> (B, H/s, W/s, 4 * features)``.
    """

    features: int
    strides: int = 1
    expansion: int = 4

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        out = self.features * self.expansion
        y = nn.relu(_bn(train, "bn1")(_conv(self.features, 1, 1, "conv1")(x)))
        y = nn.relu(_bn(train, "bn2")(_conv(self.features, 3, self.strides, "conv2")(y)))
        y = _bn(train, "bn3")(_conv(out, 1, 1, "conv3")(y))
        return nn.relu(_shortcut(x, out, self.strides, train) + y)


def _shortcut(x: jnp.ndarray, out: int, strides: int, train: bool) -> jnp.ndarray:
    """Identity, or 1x1 strided projection + BN (called inside a block's compact scope)."""
    if strides == 1 and x.shape[-1] == out:
        return x
    x = _conv(out, 1, strides, "downsample_conv")(x)
    return _bn(train, "downsample_bn")(x)


class ResNet(nn.Module):
    """torchvision ImageNet ResNet.

    Stem ``conv1`` 7x7/2 (pad 3) -> ``bn1`` -> ReLU -> 3x3/2 max-pool (pad 1); stages
    ``layer1..layer4`` of ``stage_sizes`` blocks with widths 64, 128, 256, 512 (stride 2 at
    the first block of stages 2-4); global average pool; ``fc`` Dense(num_classes).
    Input ``(B, H, W, 3)`` with H, W >= 32; output ``(B, num_classes)``.
    """

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    block: type[nn.Module] = BasicBlock
    num_classes: int = 1000
    widths: Sequence[int] = (64, 128, 256, 512)

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        if x.ndim != 4 or min(x.shape[1:3]) < 32:
            raise ValueError(f"ResNet expects NHWC input with H, W >= 32, got {x.shape}")
        x = _conv(self.widths[0], 7, 2, "conv1")(x)
        x = nn.relu(_bn(train, "bn1")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, (n_blocks, width) in enumerate(zip(self.stage_sizes, self.widths, strict=True)):
            for b in range(n_blocks):
                strides = 2 if stage > 0 and b == 0 else 1
                x = self.block(width, strides, name=f"layer{stage + 1}_{b}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="fc")(x)


class ResNet18(ResNet):
    """torchvision resnet18: BasicBlock x [2, 2, 2, 2]; 11,689,512 parameters."""

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    block: type[nn.Module] = BasicBlock


class ResNet50(ResNet):
    """torchvision resnet50 (v1.5): Bottleneck x [3, 4, 6, 3]; 25,557,032 parameters."""

    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    block: type[nn.Module] = Bottleneck


def _adaptive_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) averaging matrix of torch's adaptive_avg_pool (bins floor/ceil)."""
    m = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def adaptive_avg_pool(x: jnp.ndarray, size: tuple[int, int]) -> jnp.ndarray:
    """torch ``adaptive_avg_pool2d`` on NHWC ``x`` -> ``(B, size[0], size[1], C)``.

    Identity when the spatial size already equals ``size`` (VGG-16 at 224x224).
    """
    h, w = x.shape[1:3]
    if (h, w) == tuple(size):
        return x
    mh, mw = _adaptive_matrix(h, size[0]), _adaptive_matrix(w, size[1])
    return jnp.einsum("ih,jw,bhwc->bijc", mh, mw, x)


_VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip


class VGG16(nn.Module):
    """torchvision vgg16 (configuration D), or vgg16_bn with ``use_bn=True``.

    13 x [Conv 3x3 pad 1 (+ BN) -> ReLU] with 5 max-pools 2x2/2 (widths 64-64, 128-128,
    256x3, 512x3, 512x3); adaptive average pool to 7x7; flatten (H, W, C order, NHWC) ->
    Dense 4096 -> ReLU -> Dropout -> Dense 4096 -> ReLU -> Dropout -> Dense(num_classes).
    Names ``features_{i}`` / ``classifier_{i}`` are torchvision's Sequential indices.
    Input ``(B, H, W, 3)``, 224x224 for the reference model; output ``(B, num_classes)``.
    Note: torchvision flattens (C, H, W); a converter must permute ``classifier_0``'s rows.
    """

    num_classes: int = 1000
    use_bn: bool = False
    dropout: float = 0.5

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        if x.ndim != 4 or min(x.shape[1:3]) < 32:
            raise ValueError(f"VGG16 expects NHWC input with H, W >= 32, got {x.shape}")
        i = 0  # torchvision index in vgg.features
        for v in _VGG16_CFG:
            if v == "M":
                x = _models.max_pool_2x2(x)
                i += 1
                continue
            x = nn.Conv(v, (3, 3), padding=((1, 1), (1, 1)), kernel_init=_conv_init,
                        name=f"features_{i}")(x)  # fmt: skip
            if self.use_bn:
                x = _bn(train, f"features_{i + 1}")(x)
            x = nn.relu(x)
            i += 3 if self.use_bn else 2
        x = adaptive_avg_pool(x, (7, 7))
        x = x.reshape((x.shape[0], -1))
        for j in (0, 3):
            x = nn.Dense(4096, kernel_init=_vgg_dense_init, name=f"classifier_{j}")(x)
            x = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(x))
        return nn.Dense(self.num_classes, kernel_init=_vgg_dense_init, name="classifier_6")(x)


IMAGENET_MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": ResNet18,
    "resnet50": ResNet50,
    "vgg16": VGG16,
}


def create_imagenet_model(name: str, **kwargs: Any) -> nn.Module:
    """Build "resnet18", "resnet50" or "vgg16" (kwargs: ``num_classes``; VGG: ``use_bn``)."""
    try:
        cls = IMAGENET_MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown ImageNet model {name!r}; choose one of {sorted(IMAGENET_MODELS)}"
        ) from None
    return cls(**kwargs)


def synthetic_images(n: int, size: int = 224, seed: int = 0) -> np.ndarray:
    """``(n, size, size, 3)`` float32 stand-ins for ImageNet-normalized images.

    Smooth random fields (noise at 1/8 resolution, bilinearly upsampled) plus fine noise
    (std 0.03), clipped to [0, 1] and normalized with the ImageNet mean/std: values in
    [-2.12, 2.64], neighbouring pixels correlated (~0.95) like natural images. Deterministic
    in ``seed``. For timing and shape tests only: no semantic content.
    """
    if n < 1 or size < 8:
        raise ValueError(f"need n >= 1 and size >= 8, got n={n}, size={size}")
    rng = np.random.default_rng(seed)
    low = max(size // 8, 2)
    out = np.empty((n, size, size, 3), np.float32)
    mean, std = np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)
    for s in range(0, n, 64):  # chunks bound the temporary memory
        k = min(64, n - s)
        coarse = rng.normal(0.5, 0.25, (k, low, low, 3)).astype(np.float32)
        img = np.array(jax.image.resize(coarse, (k, size, size, 3), "bilinear"))
        img += rng.normal(0.0, 0.03, img.shape).astype(np.float32)
        out[s : s + k] = (np.clip(img, 0.0, 1.0) - mean) / std
    return out


def _leaf_names(path: tuple) -> tuple[str, ...]:
    return tuple(str(k.key) for k in path)


def init_variables(
    model: nn.Module, seed: int = 0, size: int = 224, stats_images: int = 8
) -> dict[str, Any]:
    """Random variables ``{"params"[, "batch_stats"]}`` that look like a trained model's.

    Works for any Linen model built from Conv / Dense / BatchNorm taking
    ``(x, train=...)`` with NHWC RGB input of ``size`` x ``size``. Params are drawn with
    numpy (no XLA compile of an init graph; shapes come from ``jax.eval_shape``):

    - Conv kernels ``(kh, kw, cin, cout)``: N(0, 2 / (kh kw cout)) (torchvision's
      kaiming_normal, fan_out); Dense kernels ``(in, out)``: N(0, 1 / in); biases 0.
    - BatchNorm ``scale`` ~ U(0.5, 1.5) and ``bias`` ~ N(0, 0.1^2) instead of 1 and 0.
    - batch_stats: the per-channel mean and variance each BatchNorm sees in one train-mode
      pass over ``stats_images`` :func:`synthetic_images` of ``size``. So the running
      statistics are non-trivial (varying per channel, variances > 0) and consistent with
      the network: eval-mode activations stay well scaled through all layers as in a trained
      model, and BatchNorm is not the identity (which matters for BN folding).

    Deterministic in ``seed``. Costs one jitted forward pass of ``stats_images`` images
    (skipped for models without BatchNorm, e.g. VGG16 by default, which get only params).
    ``stats_images=0`` skips it: running means ~ N(0, 0.1^2) and variances ~ U(0.5, 2), so
    BatchNorm is still not the identity but activations are not normalized (shape tests).
    Not trained weights: accuracy is chance; use it for timing, memory and error-scaling
    tests.
    """
    x0 = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    abstract = jax.eval_shape(lambda xb: model.init(jax.random.key(0), xb, train=False), x0)
    momenta = _bn_momenta(model, abstract, x0)
    rng = np.random.default_rng(seed)
    params = _draw_params(abstract["params"], momenta, rng)
    if "batch_stats" not in abstract:
        return {"params": params}
    if stats_images <= 0:
        return {"params": params, "batch_stats": _draw_batch_stats(abstract["batch_stats"], rng)}
    x = jnp.asarray(synthetic_images(stats_images, size, seed + 1))
    stats = _measured_batch_stats(model, params, abstract["batch_stats"], momenta, x, seed)
    return {"params": params, "batch_stats": stats}


def _bn_momenta(model: nn.Module, abstract: Any, x0: jax.ShapeDtypeStruct) -> dict:
    """BatchNorm module path -> its momentum, seen in one abstract forward pass."""
    momenta: dict[tuple[str, ...], float] = {}

    def record_bn(module, path, kind, args, kwargs, call):
        if kind == "bn":
            momenta[tuple(str(k) for k in path)] = module.momentum
        return call()

    jax.eval_shape(
        lambda v, xb: intercepted_forward(model, None, v, (xb,), {"train": False}, record_bn),
        abstract,
        x0,
    )
    return momenta


def _draw_params(abstract_params: Any, momenta: dict, rng: np.random.Generator) -> Any:
    """Random params of the shapes of ``abstract_params`` (see :func:`init_variables`)."""

    def draw(path: tuple, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        names, shape = _leaf_names(path), leaf.shape
        if names[:-1] in momenta and names[-1] == "scale":
            v = rng.uniform(0.5, 1.5, shape)
        elif names[:-1] in momenta and names[-1] == "bias":
            v = rng.normal(0.0, 0.1, shape)
        elif names[-1] == "kernel" and len(shape) >= 3:
            v = rng.standard_normal(shape, np.float32) * np.sqrt(
                2.0 / np.prod(shape[:-2]) / shape[-1]
            )
        elif names[-1] == "kernel" and len(shape) == 2:
            v = rng.standard_normal(shape, np.float32) / np.sqrt(shape[0])
        else:
            v = np.zeros(shape)
        return jnp.asarray(v, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract_params)


def _draw_batch_stats(abstract_stats: Any, rng: np.random.Generator) -> Any:
    """Random running statistics: means ~ N(0, 0.1^2), variances ~ U(0.5, 2)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, a: jnp.asarray(
            rng.uniform(0.5, 2.0, a.shape) if p[-1].key == "var" else rng.normal(0.0, 0.1, a.shape),
            a.dtype,
        ),
        abstract_stats,
    )


def _measured_batch_stats(
    model: nn.Module, params: Any, abstract_stats: Any, momenta: dict, x: jax.Array, seed: int
) -> Any:
    """The batch mean and variance each BatchNorm sees in one train-mode pass over ``x``."""
    # One train-mode pass from running stats (mean 0, var 1). Flax stores
    # ra = m * ra_old + (1 - m) * batch, so batch = (ra - m * ra_old) / (1 - m).
    old = jax.tree_util.tree_map_with_path(
        lambda p, a: jnp.full(a.shape, 1.0 if p[-1].key == "var" else 0.0, a.dtype),
        abstract_stats,
    )
    train_pass = jax.jit(
        lambda v, xb: model.apply(
            v, xb, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(seed)}
        )[1]
    )
    upd = train_pass({"params": params, "batch_stats": old}, x)

    def batch_stat(path: tuple, new: jax.Array, prev: jax.Array) -> jax.Array:
        m = momenta[_leaf_names(path)[:-1]]
        v = (new - m * prev) / (1.0 - m)
        return jnp.maximum(v, 1e-5) if path[-1].key == "var" else v

    return jax.tree_util.tree_map_with_path(batch_stat, upd["batch_stats"], old)


# Register in the shared model registry so experiments.models.create_model("resnet18") works
# once this module is imported (models.py itself stays independent of this module).
for _name, _ctor in IMAGENET_MODELS.items():
    _models.MODELS.setdefault(_name, _ctor)
