"""Model-level operations: convert a model to AB layers, merge it back, measure compression.

Layers are chosen by type (nn.Linear, nn.Conv2d with groups=1, transformers' Conv1D), never by a
model's module names, so any architecture works. By default the first and the last factorizable
layer in registration order (the stem or patch embedding, and the classifier head) stay dense,
as do every 1-D parameter, embeddings, and grouped or depthwise convs. ``target_modules`` and
``exclude_modules`` (peft-style name patterns) override the default selection.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from torch import nn

from .config import ABConfig
from .layers import ABLayer, is_factorizable, wrap


def _matches(name: str, pattern: list[str] | str) -> bool:
    """peft's rule: a string is a regex matched against the whole name; a list holds suffixes."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern)


def select_layers(model: nn.Module, config: ABConfig) -> list[str]:
    """Names of the modules :func:`convert` would factorize, in registration order."""
    candidates = [name for name, m in model.named_modules()
                  if name and is_factorizable(m) and not _inside_attention(model, name)]
    if config.target_modules is None:
        chosen = candidates[1:-1]
    elif config.target_modules == "all":
        chosen = list(candidates)
    else:
        chosen = [n for n in candidates if _matches(n, config.target_modules)]
    if config.exclude_modules is not None:
        chosen = [n for n in chosen if not _matches(n, config.exclude_modules)]
    return chosen


def _inside_attention(model: nn.Module, name: str) -> bool:
    # nn.MultiheadAttention reads out_proj.weight directly in its fused kernel: leave it dense.
    parent = name.rpartition(".")[0]
    return isinstance(model.get_submodule(parent) if parent else model, nn.MultiheadAttention)


def convert(model: nn.Module, config: ABConfig | dict[str, Any] | None = None) -> nn.Module:
    """Replace the selected layers of ``model`` by AB layers, in place; returns the model.

    The AB layers start in full mode holding the very same weight parameters, so the model's
    outputs and state-dict keys are unchanged until the first factorization. With
    ``config.orthogonal_init`` every converted weight's singular values are set to 1.
    Converting twice is a no-op for layers that are already AB layers.
    """
    config = ABConfig() if config is None else ABConfig.from_dict(config)
    if not config.enabled:
        return model
    names = select_layers(model, config)
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, ABLayer):
            continue
        layer = wrap(module)
        if layer is None:  # pragma: no cover - select_layers only returns factorizable ones
            continue
        layer.train(module.training)
        _set_submodule(model, name, layer)
        if config.orthogonal_init:
            layer.orthogonalize()
    return model


def ab_layers(model: nn.Module) -> Iterator[tuple[str, ABLayer]]:
    """(name, layer) for every AB layer of the model, in registration order."""
    for name, module in model.named_modules():
        if isinstance(module, ABLayer):
            yield name, module


def merge(model: nn.Module) -> nn.Module:
    """Replace every AB layer by a plain nn.Linear / nn.Conv2d / Conv1D with W = A B, in place.

    The result has the state-dict keys of the original model and loads with plain torch or
    transformers, without ab_accel installed.
    """
    for name, layer in list(ab_layers(model)):
        dense = layer.to_dense_module()
        dense.train(layer.training)
        _set_submodule(model, name, dense)
    return model


def compression(model: nn.Module) -> dict[str, Any]:
    """How much smaller the model is now than its dense self.

    Returns ``params_now`` (all parameters allocated now), ``params_dense`` (the same model with
    every AB layer dense), ``ratio`` = params_dense / params_now, the same three numbers over the
    factorized layers only (``factorized_params_now``, ``factorized_params_dense``,
    ``factorized_ratio``: the paper's compression of the low-rank layers), and ``layers``:
    per-layer shape, mode and rank.
    """
    params_now = sum(p.numel() for p in model.parameters())
    layers: dict[str, dict[str, Any]] = {}
    fact_now = fact_dense = 0
    for name, layer in ab_layers(model):
        now = layer.numel_now
        fact_now += now
        fact_dense += layer.dense_numel
        layers[name] = {"shape": [layer.out_dim, layer.in_dim], "mode": layer.mode,
                        "rank": layer.rank, "max_rank": layer.max_rank,
                        "params_now": now, "params_dense": layer.dense_numel}
    params_dense = params_now - fact_now + fact_dense
    return {
        "params_now": params_now,
        "params_dense": params_dense,
        "ratio": params_dense / params_now if params_now else 1.0,
        "factorized_params_now": fact_now,
        "factorized_params_dense": fact_dense,
        "factorized_ratio": fact_dense / fact_now if fact_now else 1.0,
        "layers": layers,
    }


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
