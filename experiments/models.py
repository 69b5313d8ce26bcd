"""Flax Linen models of the GPFQ papers' experiments.

All layers are plain ``nn.Dense`` / ``nn.Conv`` / ``nn.BatchNorm`` so that the quantizer can
intercept the Dense and Conv calls. Kernels use Flax layouts: Dense ``(in, out)``, Conv
``(kh, kw, cin, cout)``. Inputs are float images ``(B, H, W, C)`` (NHWC); outputs are logits
``(B, num_classes)``. BatchNorm uses running averages when ``train=False`` and dropout is
deterministic then, so evaluation and calibration need no RNG.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

__all__ = ["max_pool_2x2", "MLP", "CifarCNN", "BasicBlock", "ResNet20", "MODELS", "create_model"]

_BN_MOMENTUM = 0.9
_BN_EPS = 1e-5


def _bn(train: bool, name: str | None = None) -> nn.BatchNorm:
    return nn.BatchNorm(
        use_running_average=not train, momentum=_BN_MOMENTUM, epsilon=_BN_EPS, name=name
    )


def max_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
    """2x2 max-pool, stride 2, on (B, H, W, C); same values as ``nn.max_pool(x, (2, 2), (2, 2))``.

    For even H, W it is a reshape + max, whose gradient XLA:CPU runs ~5x faster than the
    select-and-scatter of ``nn.max_pool`` (ties get split gradients instead of one winner).
    """
    b, h, w, c = x.shape
    if h % 2 or w % 2:
        return nn.max_pool(x, (2, 2), strides=(2, 2))
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class MLP(nn.Module):
    """JMLR MNIST MLP (784-500-300-10 by default).

    Flatten -> [Dense -> BatchNorm -> ReLU] per hidden width -> Dense(num_classes).
    Input ``(B, ...)``, flattened to ``(B, prod(...))``; output logits ``(B, num_classes)``.
    """

    features: Sequence[int] = (500, 300)
    num_classes: int = 10
    use_bn: bool = True

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = x.reshape((x.shape[0], -1))
        for width in self.features:
            x = nn.Dense(width)(x)
            if self.use_bn:
                x = _bn(train)(x)
            x = nn.relu(x)
        return nn.Dense(self.num_classes)(x)


class CifarCNN(nn.Module):
    """JMLR CIFAR-10 CNN.

    Three stages of two [Conv 3x3 ('SAME') -> BN -> ReLU] with ``widths`` channels, each stage
    followed by 2x2 max-pool and dropout (``dropout`` rates), then flatten -> Dense(dense) ->
    BN -> ReLU -> Dropout(dense_dropout) -> Dense(num_classes). Input ``(B, 32, 32, 3)``.
    """

    widths: Sequence[int] = (32, 64, 128)
    dropout: Sequence[float] = (0.2, 0.3, 0.4)
    dense: int = 128
    dense_dropout: float = 0.5
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        for width, rate in zip(self.widths, self.dropout, strict=True):
            for _ in range(2):
                x = nn.Conv(width, (3, 3), padding="SAME")(x)
                x = nn.relu(_bn(train)(x))
            x = max_pool_2x2(x)
            x = nn.Dropout(rate, deterministic=not train)(x)
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(_bn(train)(nn.Dense(self.dense)(x)))
        x = nn.Dropout(self.dense_dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes)(x)


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN (+ shortcut) -> ReLU.

    The shortcut is identity, or a 1x1 strided conv + BN when the stride or channel count
    changes (option B). Input ``(B, H, W, Cin)``, output ``(B, H/stride, W/stride, features)``.
    """

    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        s = (self.strides, self.strides)
        y = nn.Conv(self.features, (3, 3), strides=s, padding=1, use_bias=False)(x)
        y = nn.relu(_bn(train)(y))
        y = nn.Conv(self.features, (3, 3), padding=1, use_bias=False)(y)
        y = _bn(train)(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), strides=s, use_bias=False, name="proj")(x)
            x = _bn(train, name="proj_bn")(x)
        return nn.relu(x + y)


class ResNet20(nn.Module):
    """CIFAR ResNet-20 (He et al. 2016): conv3x3(16)-BN-ReLU, 3 stages x ``blocks`` basic
    blocks with ``widths`` channels (stride 2 at the start of stages 2 and 3), global average
    pool, Dense(num_classes). About 0.27M parameters. Input ``(B, 32, 32, 3)``.
    """

    widths: Sequence[int] = (16, 32, 64)
    blocks: int = 3
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = nn.Conv(self.widths[0], (3, 3), padding=1, use_bias=False)(x)
        x = nn.relu(_bn(train)(x))
        for stage, width in enumerate(self.widths):
            for block in range(self.blocks):
                strides = 2 if stage > 0 and block == 0 else 1
                x = BasicBlock(width, strides)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cifar_cnn": CifarCNN,
    "resnet20": ResNet20,
}


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model by name ("mlp", "cifar_cnn", "resnet20")."""
    try:
        cls = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}") from None
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return cls(**kwargs)
