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

from . import patches
from .comm import wire_factor
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
    patches.ddp_ignore_factorized(model, sorted(ignored))


def hand_reduction_to_ab(ddp: nn.parallel.DistributedDataParallel) -> None:
    """No gradient all-reduce and no buffer broadcast from DDP, for the rest of the run
    (:func:`ab_accel.patches.ddp_stop_reducing`)."""
    patches.ddp_stop_reducing(ddp)


def wrap(model: nn.Module, **ddp_kwargs: Any) -> nn.parallel.DistributedDataParallel:
    """``DistributedDataParallel(model, **ddp_kwargs)`` for a converted model, AB-ready."""
    ignore_factorized_weights(model)
    ddp = nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
    hand_reduction_to_ab(ddp)
    return ddp


class DDPTraffic:
    """What plain DDP sends on this rank, counted where it is sent (the baseline AB-training is
    measured against): a comm hook counts every gradient bucket, then runs ``hook`` (torch's
    all-reduce by default, or any comm hook with its ``state``: a compression hook, PowerSGD);
    a forward pre-hook counts the buffer broadcasts DDP decides to make (BatchNorm statistics).

    ``bytes``: the payload handed to gloo/NCCL; ``wire_bytes``: what the ring sends for it
    (2(g-1)/g of an all-reduce's payload over g ranks, (g-1)/g of a broadcast's), the estimate
    ab_accel's own meter uses. ``per_step`` holds the wire bytes of every step ended with
    :meth:`mark_step` (traffic over time, for plots). Checkpointable (``state_dict``).
    """

    def __init__(self, ddp: nn.parallel.DistributedDataParallel, hook: Any = None,
                 state: Any = None) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        self.world_size = ddp.process_group.size() if hasattr(ddp, "process_group") else 1
        self.grad_bytes = self.buffer_bytes = self.calls = 0  # calls: buckets handed to the hook
        self.per_step: list[float] = []
        self._marked = 0.0
        if hook is None:  # torch's own all-reduce over DDP's process group
            hook, state = default_hooks.allreduce_hook, getattr(ddp, "process_group", None)
        self._hook, self._state = hook, state
        self._buffers = sum(b.numel() * b.element_size() for b in ddp.buffers())
        ddp.register_comm_hook(self, DDPTraffic._count_bucket)
        ddp.register_forward_pre_hook(self._count_buffers)

    @staticmethod
    def _count_bucket(counter, bucket):  # no annotations: DDP checks them (dist.GradBucket)
        counter.grad_bytes += bucket.buffer().numel() * bucket.buffer().element_size()
        counter.calls += 1
        return counter._hook(counter._state, bucket)

    def _count_buffers(self, module: Any, args: Any) -> None:
        self.buffer_bytes += self._buffers if module.will_sync_module_buffers() else 0

    @property
    def bytes(self) -> int:
        return self.grad_bytes + self.buffer_bytes

    @property
    def wire_bytes(self) -> float:
        return (self.grad_bytes * wire_factor("all_reduce", self.world_size)
                + self.buffer_bytes * wire_factor("broadcast", self.world_size))

    def mark_step(self) -> None:
        """An optimizer step ended: append its wire bytes to :attr:`per_step`."""
        self.per_step.append(self.wire_bytes - self._marked)
        self._marked = self.wire_bytes

    def summary(self) -> dict[str, Any]:
        return {"measured_by": "DDP comm hook (gradient buckets) + buffer broadcasts",
                "bytes": self.bytes, "wire_bytes": self.wire_bytes,
                "grad_bytes": self.grad_bytes, "buffer_bytes": self.buffer_bytes,
                "calls": self.calls}

    def state_dict(self) -> dict[str, Any]:
        return {"grad_bytes": self.grad_bytes, "buffer_bytes": self.buffer_bytes,
                "calls": self.calls, "per_step": list(self.per_step)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.grad_bytes, self.buffer_bytes = state["grad_bytes"], state["buffer_bytes"]
        self.calls = state.get("calls", 0)
        self.per_step, self._marked = list(state.get("per_step", [])), self.wire_bytes


__all__ = ["ignore_factorized_weights", "hand_reduction_to_ab", "wrap", "DDPTraffic"]
