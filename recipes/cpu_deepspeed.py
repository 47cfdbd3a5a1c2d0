"""The HF Trainer's DeepSpeed branch on CPU processes (gloo), for the recipes and the tests.

Not AB-training: a launch helper (formerly ``ab_accel.trainer.setup_cpu_deepspeed``; that path
still finds it here).
"""

from __future__ import annotations

import os
from typing import Any


def setup_cpu_deepspeed(backend: str = "gloo") -> dict[str, Any]:
    """Make the Trainer's DeepSpeed branch run on CPU processes: the Trainer ignores
    ``ddp_backend`` there, so the process group is set up here first (``PartialState`` with
    ``backend``, DeepSpeed turned on). Call before building ``TrainingArguments`` and pass the
    returned dict as ``accelerator_config``. Not needed on GPUs."""
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend=backend)
    return {"use_configured_state": True}


__all__ = ["setup_cpu_deepspeed"]
