"""ab_accel imports with its core dependencies only (torch, numpy, tqdm): every framework and
optional extra is imported where it is used."""

from __future__ import annotations

import subprocess
import sys

OPTIONAL = ("accelerate", "deepspeed", "transformers", "jsonargparse", "datasets", "peft",
            "torchvision", "matplotlib")


def test_the_core_imports_without_any_optional_extra():
    blocked = ", ".join(repr(m) for m in OPTIONAL)
    code = (
        "import sys\n"
        f"for name in ({blocked},):\n"
        "    sys.modules[name] = None  # import name raises ImportError\n"
        "import ab_accel, ab_accel.cli, ab_accel.attach, ab_accel.patches, ab_accel.engine\n"
        "import ab_accel.ds_config, ab_accel.ddp, ab_accel.checkpoint\n"
        "try:\n"
        "    ab_accel.cli.make_parser('x', 'y')\n"
        "except ImportError as exc:\n"
        "    assert 'pip install jsonargparse' in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('make_parser without jsonargparse')\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
