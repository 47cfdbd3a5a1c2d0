"""The wrapped optimizer's parameter lists, kept pointing at the tensors that exist now.

A switch re-creates tensors (W at a sync, A and B at a factorization), so the torch optimizer's
``param_groups`` would hold dead ones. :class:`ParamSlots` remembers, per group, its entries as
*slots*: a dense parameter, or an AB layer (whose live factors, ``factor_params()``, stand in
its place). :meth:`ParamSlots.refresh` rewrites every group's ``params`` from them and drops the
optimizer state of tensors that no longer exist (they restart from fresh state; the LR rebound
covers that).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .layers import ABLayer


class ParamSlots:
    """The slots of ``optimizer``'s groups over ``layers``; see the module docstring."""

    def __init__(self, optimizer: torch.optim.Optimizer, layers: list[ABLayer]) -> None:
        self.optimizer = optimizer
        self.layers = layers
        self._slots = [self._slots_for(g) for g in optimizer.param_groups]
        self._version = -1

    def _slots_for(self, group: dict[str, Any]) -> list[nn.Parameter | ABLayer]:
        owner = {id(p): layer for layer in self.layers for p in layer.factor_params()}
        slots: list[nn.Parameter | ABLayer] = []
        seen: set[int] = set()
        for p in group["params"]:
            layer = owner.get(id(p))
            if layer is None:
                slots.append(p)
            elif id(layer) not in seen:
                seen.add(id(layer))
                slots.append(layer)
        return slots

    def added(self) -> None:
        """The optimizer got a new group (``add_param_group``): follow it too."""
        self._slots.append(self._slots_for(self.optimizer.param_groups[-1]))
        self._version = -1

    @property
    def stale(self) -> bool:
        """A layer changed structure since the last :meth:`refresh`."""
        return self._version != self._structure_version()

    def _structure_version(self) -> int:
        return sum(layer.structure_version for layer in self.layers)

    def refresh(self) -> None:
        """Point the wrapped optimizer at the tensors that exist now; drop stale state."""
        live: set[int] = set()
        for group, slots in zip(self.optimizer.param_groups, self._slots, strict=True):
            params: list[nn.Parameter] = []
            for slot in slots:
                params.extend(slot.factor_params() if isinstance(slot, ABLayer) else [slot])
            group["params"] = params
            live.update(id(p) for p in params)
        for p in list(self.optimizer.state.keys()):
            if id(p) not in live:
                del self.optimizer.state[p]
        self._version = self._structure_version()


__all__ = ["ParamSlots"]
