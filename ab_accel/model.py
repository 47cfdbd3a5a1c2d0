"""Model-level operations: convert a model to AB layers, merge it back, measure compression.

Layers are chosen by type (nn.Linear, nn.Conv2d with groups=1, transformers' Conv1D), never by a
model's module names, so any architecture works. By default the first and the last factorizable
layer in registration order (the stem or patch embedding, and the classifier head) stay dense,
as do every 1-D parameter, embeddings, and grouped or depthwise convs. ``target_modules`` and
``exclude_modules`` (peft-style name patterns) override the default selection.

A weight shared with another parameter (tied input/output embeddings, such as BERT's MLM decoder
or GPT-2's ``lm_head``) or a module registered under two names is never factorized, whatever
``target_modules`` says: factorizing it would release a weight that another module still uses,
which then silently stops training. Naming such a layer explicitly is an error that names the
tie.
"""

from __future__ import annotations

import copy
import re
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .config import ABConfig, ABConfigError
from .layers import ABLayer, is_factorizable, is_transformers_conv1d, wrap


def _matches(name: str, pattern: list[str] | str) -> bool:
    """peft's rule: a string is a regex matched against the whole name; a list holds suffixes."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern)


def select_layers(model: nn.Module, config: ABConfig) -> list[str]:
    """Names of the modules :func:`convert` would factorize, in registration order.

    Raises :class:`ABConfigError` for a ``target_modules`` that is not a valid regex, that
    matches no factorizable layer, or that names a layer whose weight is shared (see the module
    docstring)."""
    candidates = [name for name, m in model.named_modules()
                  if name and is_factorizable(m) and not _inside_attention(model, name)]
    targets = config.target_modules
    ties = shared_weights(model)
    if targets is None:
        chosen = candidates[1:-1]
    elif targets == "all":
        chosen = list(candidates)
    else:
        chosen = [n for n in candidates if _matches(n, _pattern(targets, "target_modules"))]
        if not chosen:
            raise ABConfigError(
                f"ab_training.target_modules={targets!r} matches none of the model's "
                f"{len(candidates)} factorizable layers (nn.Linear, nn.Conv2d, Conv1D), e.g. "
                f"{', '.join(candidates[:4]) or 'none'}. A list holds name suffixes "
                f"(['q_proj', 'fc1']); a string is a regex matched against the whole name.")
        tied = [n for n in chosen if n in ties]
        if tied:
            raise ABConfigError(
                f"ab_training.target_modules names {', '.join(tied)}, whose weight is shared "
                f"with {', '.join(ties[tied[0]])} (tied weights, or one module registered twice). "
                f"Factorizing it would release a weight the other user still holds, which would "
                f"then stop training. Remove it from target_modules: shared weights stay dense.")
    if config.exclude_modules is not None:
        exclude = _pattern(config.exclude_modules, "exclude_modules")
        chosen = [n for n in chosen if not _matches(n, exclude)]
    return [n for n in chosen if n not in ties]


def why_nothing_to_factorize(model: nn.Module) -> str:
    """What to do when a model holds no AB layer (for the errors of the optimizer and prepare)."""
    candidates = [name for name, m in model.named_modules()
                  if name and is_factorizable(m) and not _inside_attention(model, name)]
    if not candidates:
        return ("the model has no nn.Linear, nn.Conv2d (groups=1) or transformers Conv1D layer "
                "to factorize: train it without AB-training.")
    if len(candidates) <= 2:
        return (f"its only factorizable layers, {' and '.join(candidates)}, are the first and "
                f"the last one, which convert() keeps dense by default (stem and head). "
                f"Set target_modules='all' (or name them) to factorize them.")
    return ("call ab_accel.convert(model, config) before building the ABOptimizer (and before "
            "accelerator.prepare), or check that target_modules matches some layers.")


def shared_weights(model: nn.Module) -> dict[str, list[str]]:
    """Factorizable modules whose weight has another user: name -> the other names.

    A weight is shared when the same parameter appears under two names (tied embeddings) or
    the same module object is registered under two names.
    """
    users: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        users[id(param)].append(name.rpartition(".")[0] if name.endswith(".weight") else name)
    owners: dict[int, list[str]] = defaultdict(list)
    for name, module in model.named_modules(remove_duplicate=False):
        if name:
            owners[id(module)].append(name)
    out: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if not name or not is_factorizable(module):
            continue
        weight = module._parameters.get("weight")
        others = [n for n in owners[id(module)] if n != name]
        if weight is not None:
            others += [n for n in users[id(weight)] if n != name and n not in owners[id(module)]]
        if others:
            out[name] = others
    return out


def _pattern(value: list[str] | str, field: str) -> list[str] | str:
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as exc:
            raise ABConfigError(
                f"ab_training.{field}={value!r} is not a valid regular expression ({exc}). A "
                f"string is a regex matched against the whole module name (e.g. "
                f"'.*\\.(q|v)_proj'); give a list for name suffixes (['q_proj', 'v_proj'])."
            ) from None
    return value


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

    ``config.residual`` makes every AB layer keep W_res = W - A B at its factorizations (see
    :mod:`ab_accel.layer_base`); ``config.freeze_untargeted`` sets ``requires_grad=False`` on every
    parameter that is not an AB layer's weight or factor (biases of the AB layers included), as
    peft does, so the ABOptimizer, which reduces and syncs trainable parameters only, never
    sends them.
    """
    config = ABConfig() if config is None else ABConfig.from_dict(config)
    if not config.enabled:
        return model
    names = select_layers(model, config)
    residual_dtype = _DTYPES.get(config.residual_dtype) if config.residual_dtype else None
    for name in names:
        module = model.get_submodule(name)
        layer = module if isinstance(module, ABLayer) else wrap(module)
        if layer is None:  # pragma: no cover - select_layers only returns factorizable ones
            continue
        layer.keep_residual = config.residual
        layer.residual_dtype = residual_dtype
        if layer is module:
            continue
        layer.train(module.training)
        _set_submodule(model, name, layer)
        if config.orthogonal_init:
            layer.orthogonalize()
    if config.freeze_untargeted:
        freeze_untargeted(model)
    return model


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def freeze_untargeted(model: nn.Module) -> list[str]:
    """``requires_grad=False`` on every parameter that is not an AB layer's weight or factor
    (``ABConfig.freeze_untargeted``); returns the names frozen. The AB layers' own weights and
    factors are left as they are (the ABOptimizer sets which factor trains)."""
    kept = {id(p) for _, layer in ab_layers(model) for p in layer.factor_params()}
    if not kept:
        raise ABConfigError(
            "ab_training.freeze_untargeted would freeze every parameter: the model has no AB "
            "layer. Call convert() with target_modules that match some layers.")
    frozen = []
    for name, param in model.named_parameters():
        if id(param) not in kept and param.requires_grad:
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


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

    Returns ``params_now`` (all parameters allocated now), ``residual_now`` (elements of the
    frozen residuals held now, ``ABConfig.residual``: not parameters, but memory), ``params_dense``
    (the same model with every AB layer dense), ``ratio`` = params_dense / (params_now +
    residual_now), the same numbers over the factorized layers only (``factorized_params_now``,
    ``factorized_params_dense``, ``factorized_ratio``: the paper's compression of the low-rank
    layers, below 1 with a residual: the model is then larger than dense, and what shrinks is
    what trains), ``trainable_params_now`` (parameters with ``requires_grad``) and ``layers``:
    per-layer shape, mode, rank (and ``residual``, its elements, where one is held).
    """
    params_now = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    layers: dict[str, dict[str, Any]] = {}
    fact_now = fact_dense = residual = 0
    for name, layer in ab_layers(model):
        now = layer.numel_now
        fact_now += now
        fact_dense += layer.dense_numel
        residual += layer.residual_numel
        layers[name] = {"shape": [layer.out_dim, layer.in_dim], "mode": layer.mode,
                        "rank": layer.rank, "max_rank": layer.max_rank,
                        "params_now": now, "params_dense": layer.dense_numel}
        if layer.residual_numel:
            layers[name]["residual"] = layer.residual_numel
    params_dense = params_now - fact_now + fact_dense
    held = params_now + residual
    return {
        "params_now": params_now,
        "residual_now": residual,
        "trainable_params_now": trainable,
        "params_dense": params_dense,
        "ratio": params_dense / held if held else 1.0,
        "factorized_params_now": fact_now,
        "factorized_params_dense": fact_dense,
        "factorized_ratio": fact_dense / (fact_now + residual) if fact_now else 1.0,
        "layers": layers,
    }


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def save_lora_adapter(model: nn.Module, base_model: nn.Module, path: str,
                      rank: int | None = None, tolerance: float = 1e-4) -> dict[str, float]:
    """Save what fine-tuning changed as a peft LoRA adapter on the ORIGINAL ``base_model``.

    For every AB layer the change is dW = (W_res + A B) - W0 (W0: the base's weight). Right
    after one factorization with ``residual`` it is [A, A0][B; -B0], of rank 2r (peft's own
    conversion of PiSSA); every re-factorization may add 2r more. dW is split by its SVD into
    ``lora_B`` (out x k) and ``lora_A`` (k x in) with k = ``rank`` (None: the smallest k that
    holds every layer's change to within ``tolerance``), saved with ``lora_alpha = k`` (scale 1)
    through peft's ``save_pretrained``, so ``PeftModel.from_pretrained(base, path)`` gives the
    fine-tuned model back.

    Refused loudly (ABConfigError, nothing written) when a parameter outside the AB layers
    differs from the base's (it trained: use ``freeze_untargeted``; an adapter holds the AB
    layers only) or when ``rank`` cannot hold some layer's change to within ``tolerance``
    (relative Frobenius error). Returns each layer's relative error. Needs peft.
    """
    from peft import LoraConfig, get_peft_model  # lazy: peft is optional

    base_params = dict(base_model.named_parameters())
    layers = dict(ab_layers(model))
    inside = {f"{name}.{p}" for name in layers for p in ("weight", "bias", "A", "B")}
    for name, param in model.named_parameters():
        if name in inside or name not in base_params:
            continue
        if not torch.equal(param.detach().cpu(), base_params[name].detach().cpu()):
            raise ABConfigError(
                f"save_lora_adapter: {name} differs from the base model's, but a LoRA adapter "
                f"holds the AB layers' change only. Train with freeze_untargeted=True (or "
                f"save_pretrained the whole model).")
    deltas: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        base = base_model.get_submodule(name)
        w0 = layer._weight_to_matrix(base.weight.detach()).double().cpu()
        deltas[name] = layer.matrix().double().cpu() - w0
        if layer.bias is not None and not torch.equal(layer.bias.detach().cpu(),
                                                      base.bias.detach().cpu()):
            raise ABConfigError(f"save_lora_adapter: the bias of {name} trained; a LoRA "
                                f"adapter (bias='none') cannot hold it. Use freeze_untargeted.")
    svds = {name: torch.linalg.svd(d, full_matrices=False) for name, d in deltas.items()}

    def error(s: torch.Tensor, k: int) -> float:
        total = float((s ** 2).sum())
        return float((s[k:] ** 2).sum() / total) ** 0.5 if total > 0 else 0.0

    if rank is None:
        rank = 1
        for _, s, _ in svds.values():
            k = 1
            while k < s.numel() and error(s, k) > tolerance:
                k += 1
            rank = max(rank, k)
    errors = {name: error(s, min(rank, s.numel())) for name, (_, s, _) in svds.items()}
    bad = {n: e for n, e in errors.items() if e > tolerance}
    if bad:
        name, err = max(bad.items(), key=lambda kv: kv[1])
        raise ABConfigError(f"save_lora_adapter: rank {rank} holds the change of {name} only "
                            f"to a relative error of {err:.2e} (> tolerance {tolerance:g}). "
                            f"Raise rank (or leave it None to take the smallest that fits).")
    peft_model = get_peft_model(copy.deepcopy(base_model), LoraConfig(
        r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none", init_lora_weights=False,
        target_modules=list(layers), fan_in_fan_out=any(
            is_transformers_conv1d(base_model.get_submodule(n)) for n in layers)))
    with torch.no_grad():
        for name, (u, s, vh) in svds.items():
            k = min(rank, s.numel())
            root = s[:k].sqrt()
            b = torch.zeros(u.shape[0], rank, dtype=torch.float64)
            a = torch.zeros(rank, vh.shape[1], dtype=torch.float64)
            b[:, :k] = u[:, :k] * root
            a[:k] = root[:, None] * vh[:k]
            lora = peft_model.base_model.model.get_submodule(name)
            lora.lora_A["default"].weight.copy_(a)
            lora.lora_B["default"].weight.copy_(b)
    peft_model.save_pretrained(path)
    return errors
