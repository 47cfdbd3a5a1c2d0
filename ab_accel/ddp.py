"""DDP and AB-training side by side: the ABOptimizer reduces, DDP only wraps.

A model wrapped in ``DistributedDataParallel`` (by you, by Accelerate or by the Trainer) can
train with AB-training when DDP is kept out of two things:

* its reducer must not hold the AB layers' weights (:func:`ignore_factorized_weights`, BEFORE
  wrapping): it never reduces here, and holding them would keep every dense W (and a gradient
  bucket for it) alive after a factorization released it;
* it must not reduce gradients or broadcast buffers (:func:`hand_reduction_to_ab`, AFTER
  wrapping): the ABOptimizer averages over the world in warm-up and rebound and inside the own
  group in an AB phase, where an all-reduce over the world would undo the groups.

:func:`wrap` does both around ``DistributedDataParallel(model, ...)``. Without DDP at all (plain
``torch.distributed``) none of this is needed: the ABOptimizer broadcasts the parameters from
rank 0 when it binds, as DDP does, and reduces every step.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .model import ab_layers


def ignore_factorized_weights(model: nn.Module) -> None:
    """Keep the AB layers' weights out of DDP's reducer (call before wrapping in DDP).

    Dense parameters (biases, norms, layers left dense) stay with DDP, which refuses a module
    without a parameter of its own; if nothing else is left, every parameter stays. Uses DDP's
    ``_set_params_and_buffers_to_ignore_for_model`` (the hook DDP reads at construction).
    """
    names = [f"{layer_name}.{pname}" for layer_name, layer in ab_layers(model)
             for pname, _ in layer.named_parameters(recurse=False) if pname != "bias"]
    ignored = set(names) | set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
    if not any(p.requires_grad for n, p in model.named_parameters() if n not in ignored):
        return
    setter = getattr(nn.parallel.DistributedDataParallel,
                     "_set_params_and_buffers_to_ignore_for_model", None)
    if setter is not None:
        setter(model, sorted(ignored))


def hand_reduction_to_ab(ddp: nn.parallel.DistributedDataParallel) -> None:
    """No gradient all-reduce and no buffer broadcast from DDP, for the rest of the run.

    ``require_backward_grad_sync = False`` is what ``ddp.no_sync()`` sets (and restores to the
    value it found, so ``accelerator.accumulate`` keeps it off); with it off DDP never sets
    ``require_forward_param_sync``, the switch of its buffer broadcast.
    """
    ddp.require_backward_grad_sync = False
    ddp.require_forward_param_sync = False
    ddp.broadcast_buffers = False


def wrap(model: nn.Module, **ddp_kwargs: Any) -> nn.parallel.DistributedDataParallel:
    """``DistributedDataParallel(model, **ddp_kwargs)`` for a converted model, AB-ready."""
    ignore_factorized_weights(model)
    ddp = nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
    hand_reduction_to_ab(ddp)
    return ddp


__all__ = ["ignore_factorized_weights", "hand_reduction_to_ab", "wrap"]
