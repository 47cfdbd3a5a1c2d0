"""ab_accel: AB-training (Coquelin et al., arXiv 2405.01067) for Accelerate, DeepSpeed and the
HF Trainer.

    from ab_accel import ABConfig, ABOptimizer, convert, merge, compression, prepare

The integrations (``ab_accel.accelerate``, ``ab_accel.deepspeed``, ``ab_accel.trainer``) import
their frameworks lazily: the core needs only torch.
"""

from __future__ import annotations

from typing import Any

from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from .comm import TrafficMeter
from .config import ABConfig, ABConfigError
from .layers import ABConv1D, ABConv2d, ABLayer, ABLinear, factored_state_dict
from .model import compression, convert, merge, select_layers
from .optimizer import ABOptimizer
from .schedule import ABSchedule
from .vocab import Event, LayerMode, Phase

__version__ = "0.1.0"


def prepare(accelerator: Any, *objects: Any, config: ABConfig | dict | None = None) -> Any:
    """``accelerator.prepare`` with AB-training; see :func:`ab_accel.accelerate.prepare`."""
    from .accelerate import prepare as _prepare

    return _prepare(accelerator, *objects, config=config)


__all__ = [
    "ABConfig", "ABConfigError", "ABOptimizer", "ABSchedule", "TrafficMeter",
    "ABLayer", "ABLinear", "ABConv2d", "ABConv1D",
    "convert", "merge", "compression", "select_layers", "prepare",
    "save_checkpoint", "load_checkpoint", "latest_checkpoint", "CheckpointError",
    "factored_state_dict",
    "Phase", "Event", "LayerMode", "__version__",
]
