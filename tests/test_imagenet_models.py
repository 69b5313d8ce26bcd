"""ImageNet-shape models: torchvision parameter counts, shapes, layer discovery, random init.

Parameter counts and discovery run abstractly (``jax.eval_shape``); forward passes use 64x64
inputs so every test takes seconds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import imagenet_models as im
from experiments.models import create_model
from gpfq_jax.flax.tracing import discover_layers

# torchvision: sum(p.numel() for p in resnet18/resnet50/vgg16().parameters())
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet50": 25_557_032, "vgg16": 138_357_544}
# (convs incl. projections, projections, dense) and the input size used for discovery
LAYERS = {"resnet18": (20, 3, 1, 64), "resnet50": (53, 4, 1, 64), "vgg16": (13, 0, 3, 32)}


def abstract_variables(model, size: int):
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x), x


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_param_count_matches_torchvision(name):
    variables, x = abstract_variables(im.create_imagenet_model(name), 224)
    assert sum(a.size for a in jax.tree.leaves(variables["params"])) == TORCHVISION_PARAMS[name]
    out = jax.eval_shape(lambda v, x: create_model(name).apply(v, x), variables, x)
    assert out.shape == (1, 1000)


def test_registry():
    assert type(create_model("resnet50")) is im.ResNet50
    assert create_model("vgg16", use_bn=True).use_bn
    with pytest.raises(ValueError, match="unknown ImageNet model"):
        im.create_imagenet_model("resnet101")


def test_vgg16_bn_variant_counts():
    variables, _ = abstract_variables(im.VGG16(use_bn=True), 32)
    n = sum(a.size for a in jax.tree.leaves(variables["params"]))
    assert n == TORCHVISION_PARAMS["vgg16"] + 2 * 4224  # vgg16_bn: 13 BNs, 4224 channels
    assert set(variables["params"]) >= {"features_0", "features_1", "features_3"}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_discover_layers(name):
    n_conv, n_proj, n_dense, size = LAYERS[name]
    model = create_model(name)
    variables, x = abstract_variables(model, size)
    layers = discover_layers(model, variables, x, train=False)
    kinds = [layer.kind for layer in layers]
    assert kinds.count("conv") == n_conv and kinds.count("dense") == n_dense
    assert len(layers) == n_conv + n_dense
    assert sum("downsample_conv" in layer.name for layer in layers) == n_proj
    assert kinds[-1] == "dense"


def test_adaptive_avg_pool_matches_torch_bins():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 14, 5, 3)), jnp.float32)
    y = im.adaptive_avg_pool(x, (7, 7))
    assert y.shape == (2, 7, 7, 3)
    # 14 -> 7: plain 2x2 average along H; 5 -> 7: torch bins [floor(5i/7), ceil(5(i+1)/7))
    bins = [(i * 5 // 7, -(-(i + 1) * 5 // 7)) for i in range(7)]
    xh = np.asarray(x).reshape(2, 7, 2, 5, 3).mean(2)
    ref = np.stack([xh[:, :, lo:hi].mean(2) for lo, hi in bins], axis=2)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-6)
    assert im.adaptive_avg_pool(y, (7, 7)) is y


def test_synthetic_images():
    a = im.synthetic_images(3, size=40, seed=1)
    assert a.shape == (3, 40, 40, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, im.synthetic_images(3, size=40, seed=1))
    assert not np.array_equal(a, im.synthetic_images(3, size=40, seed=2))
    assert -2.2 < a.min() and a.max() < 2.7 and 0.3 < a.std() < 1.5
    assert np.corrcoef(a[:, 1:].ravel(), a[:, :-1].ravel())[0, 1] > 0.8  # smooth, image-like


def test_resnet18_init_variables_bn_consistent():
    model = im.ResNet18()
    v = im.init_variables(model, seed=0, size=64, stats_images=4)
    bn = v["batch_stats"]["layer2_0"]["bn1"]
    assert float(bn["var"].min()) > 0 and float(jnp.std(bn["var"])) > 1e-3
    assert float(jnp.abs(bn["mean"]).max()) > 1e-3
    assert not np.allclose(v["params"]["bn1"]["scale"], 1.0)
    # running stats = batch stats of the synthetic images (checked at the stem's bn1)
    x = jnp.asarray(im.synthetic_images(4, 64, seed=1))
    h = jax.lax.conv_general_dilated(
        x, v["params"]["conv1"]["kernel"], (2, 2), ((3, 3), (3, 3)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )  # fmt: skip
    stem = v["batch_stats"]["bn1"]
    np.testing.assert_allclose(stem["mean"], h.mean((0, 1, 2)), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(stem["var"], h.var((0, 1, 2)), rtol=1e-3, atol=1e-4)
    # so eval-mode activations stay normalized down to the logits
    y = jax.jit(lambda v, x: model.apply(v, x))(v, x)
    assert y.shape == (4, 1000) and bool(jnp.all(jnp.isfinite(y)))
    assert 0.1 < float(y.std()) < 10.0


def test_resnet50_forward_small_input():
    model = im.ResNet50()
    v = im.init_variables(model, seed=0, size=64, stats_images=0)  # random stats: no pass
    assert float(v["batch_stats"]["layer4_2"]["bn3"]["var"].min()) >= 0.5
    x = jnp.asarray(im.synthetic_images(1, 64, seed=3))
    y = jax.jit(lambda v, x: model.apply(v, x))(v, x)
    assert y.shape == (1, 1000) and bool(jnp.all(jnp.isfinite(y)))
    with pytest.raises(ValueError, match="H, W >= 32"):
        jax.eval_shape(lambda v, x: model.apply(v, x), v, jnp.zeros((1, 16, 16, 3)))
