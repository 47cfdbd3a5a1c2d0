"""A ``torch.optim.Optimizer`` that wraps another one and shares its groups, state and defaults.

The base class is initialised, so a wrapper has what every torch optimizer has: the step and
state-dict hook registries (``register_step_pre_hook``, ``register_step_post_hook``, ...) and the
hooked, profiled ``step``. ``param_groups``, ``state`` and ``defaults`` are the wrapped
optimizer's own objects (properties), so an LR scheduler built on either drives the same
learning rates and a checkpoint of either holds the same moments.
"""

from __future__ import annotations

from typing import Any

import torch


def _forwarded(name: str) -> property:
    """``name`` of the wrapped optimizer (during ``torch.optim.Optimizer.__init__`` only: of a
    scratch dict, so that the base class's assignments leave the wrapped optimizer alone)."""
    def get(self: WrappingOptimizer) -> Any:
        scratch = self.__dict__.get("_base_init")
        return scratch[name] if scratch is not None else getattr(self.optimizer, name)

    def set_(self: WrappingOptimizer, value: Any) -> None:
        scratch = self.__dict__.get("_base_init")
        if scratch is not None:
            scratch[name] = value
        else:
            setattr(self.optimizer, name, value)
    return property(get, set_, doc=f"The wrapped optimizer's ``{name}``.")


class WrappingOptimizer(torch.optim.Optimizer):
    """The torch.optim surface of a wrapper around ``optimizer``; see the module docstring.

    Subclasses override ``step``; ``add_param_group`` adds to the wrapped optimizer and then
    calls :meth:`group_added`."""

    param_groups = _forwarded("param_groups")
    state = _forwarded("state")
    defaults = _forwarded("defaults")

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        # torch.optim.Optimizer.__init__ assigns param_groups, state and defaults and adds the
        # groups: meanwhile those go to a scratch dict, dropped after.
        self.__dict__["_base_init"] = {}
        try:
            groups = [{**g, "params": list(g["params"])} for g in optimizer.param_groups]
            super().__init__(groups, dict(optimizer.defaults))
        finally:
            del self.__dict__["_base_init"]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer (then :meth:`group_added`)."""
        if "_base_init" in self.__dict__:  # torch.optim.Optimizer.__init__, on the scratch
            super().add_param_group(param_group)
            return
        self.optimizer.add_param_group(param_group)
        self.group_added()

    def group_added(self) -> None:
        """Called after ``add_param_group`` added a group to the wrapped optimizer."""


__all__ = ["WrappingOptimizer"]
