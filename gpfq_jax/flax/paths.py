"""Addressing layers: path names, nested-mapping access and NNX attribute paths.

A layer's path is a tuple of keys: Linen, the module path inside ``variables['params']``
(``("block_0", "Conv_1")``); NNX, the attribute path from the root module (``("layers", 0)``).
Its name is the path joined by "/" — what rules match and reports print.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax.core import FrozenDict

Path = tuple[Any, ...]


def path_name(path: Path) -> str:
    """``("block_0", "Conv_1")`` -> ``"block_0/Conv_1"``."""
    return "/".join(str(p) for p in path)


def param_name(kind: str) -> str:
    """The name of a layer's weight: "embedding" for nn.Embed / nnx.Embed, else "kernel"."""
    return "embedding" if kind == "embed" else "kernel"


def first_input(args: tuple, kwargs: dict) -> Any:
    """A layer call's input: the first positional argument, else the ``inputs`` keyword."""
    if args:
        return args[0]
    if "inputs" in kwargs:
        return kwargs["inputs"]
    raise TypeError(f"cannot find the layer input in call arguments {list(kwargs)}")


def get_in(tree: Any, path: Path) -> Any:
    """``tree[path[0]][path[1]]...``, or None where a key is missing."""
    node = tree
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def replace_in(tree: Mapping, path: Path, value: Any) -> Mapping:
    """A copy of a nested mapping with ``path`` set to ``value``; container types kept
    (dict / FrozenDict), untouched subtrees shared."""
    key, rest = path[0], path[1:]
    child = value if not rest else replace_in(tree[key], rest, value)
    items = {**tree, key: child}
    return FrozenDict(items) if isinstance(tree, FrozenDict) else items


def module_at(model: Any, path: Path) -> Any:
    """The NNX submodule at an attribute path: str keys are attributes (items where the node
    is a mapping), int keys are items. KeyError naming the path if there is none."""
    node = model
    try:
        for key in path:
            if isinstance(key, str) and not isinstance(node, Mapping):
                node = getattr(node, key)
            else:
                node = node[key]
    except (KeyError, IndexError, AttributeError, TypeError) as e:
        raise KeyError(f"no module at path {path_name(path)!r} in the NNX model") from e
    return node


__all__ = ["Path", "path_name", "param_name", "first_input", "get_in", "replace_in", "module_at"]
