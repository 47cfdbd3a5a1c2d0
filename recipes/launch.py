"""How a recipe meets its launcher: the right number of processes, the launcher's settings it
overrides, and one line (not one per rank, not a wall of tracebacks) when it stops.

Nothing here is AB-specific; it is what `accelerate launch` and `torchrun` leave to a script:

* :func:`check_launch`: `accelerate launch --num_processes 4 script.py` on a machine without
  GPUs (and `--cpu --num_processes 4`) runs accelerate's *simple* launcher: ONE process, with
  MASTER_PORT set for the four asked for and no WORLD_SIZE. The recipe stops at once and prints
  the exact command that starts four (``--multi_gpu``; the recipes pick gloo on CPU themselves).
* :func:`check_launcher_settings`: `accelerate launch --mixed_precision fp16` (and a launcher's
  gradient accumulation) reach the script as environment variables that the recipe's own knobs
  override; a launcher value that differs from the knob is refused, naming both.
* :func:`run_main`: a refused setup (:class:`ConfigError`) prints ONE line from rank 0 and ends
  with a non-zero status on every rank. torch.distributed.elastic (under `accelerate launch
  --multi_gpu` and `torchrun`) turns any non-zero child into a ChildFailedError traceback of
  ~55 lines, and accelerate's simple launcher into a CalledProcessError traceback; neither has
  a switch for it. So the local rank 0 of a refused run ends the launcher that started it and
  its sibling ranks with SIGKILL (they would only print those tracebacks, or "Connection closed
  by peer" from a collective) after rank 0 printed the reason; the launch's exit status is then
  137 (killed), the run's own is 2. Ctrl-C ends the same way with "interrupted at step N",
  said by whichever rank handles it first (a rank blocked in a collective never would). A
  real crash (any other exception) keeps its traceback and the launcher's report.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from ab_accel import ABConfigError, latest_checkpoint
from ab_accel.accelerate import started_one_of_several
from ab_accel.cli import CommandLineError as ConfigError

# bitsandbytes (a transformers extra) warns at import, on CPU, that its optional kernels package is
# missing ("Failed to load CPU gemm_4bit_forward ..."): nothing of it is used here. It does not
# reset its loggers' levels, so this holds from the start of every process.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

# Where a run stands, for the line printed when it is interrupted (the loop updates the step;
# "checkpoints" is the folder its checkpoints go to, read at that moment: a save that Ctrl-C
# cut short is passed over, the newest complete one named).
PROGRESS: dict[str, Any] = {"step": 0, "checkpoints": None}
_LAUNCHERS = ("accelerate", "torchrun", "torch.distributed.run", "torch.distributed.launch")


def rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's global rank as the launcher set it (0 without a launcher)."""
    return int((os.environ if environ is None else environ).get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def parent_command() -> list[str]:
    """The command line of the process that started this one ([] if it cannot be read)."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as fh:
            return [a.decode() for a in fh.read().split(b"\0") if a]
    except OSError:
        return []


def check_launch(environ: Mapping[str, str] | None = None,
                 launcher: list[str] | None = None) -> None:
    """Refuse a launch that started ONE process where several were asked for, naming the
    command that starts them. ``launcher``: the launching command (None: the parent's)."""
    env = os.environ if environ is None else environ
    if not started_one_of_several(env):
        return  # a plain process, or a real multi-process launch
    cmd = parent_command() if launcher is None else launcher
    asked = next((cmd[i + 1] for i, a in enumerate(cmd[:-1]) if a == "--num_processes"),
                 next((a.split("=", 1)[1] for a in cmd if a.startswith("--num_processes=")),
                      "N"))
    cpu_flag = env["ACCELERATE_USE_CPU"].lower() in ("true", "1")
    why = ("--cpu makes accelerate launch use its simple launcher" if cpu_flag else
           "without --multi_gpu (or a --config_file that sets it) accelerate launch uses its "
           "simple launcher on a machine without GPUs")
    if "launch" in cmd:
        at = cmd.index("launch") + 1
        fixed = ["accelerate", "launch", "--multi_gpu"] + [a for a in cmd[at:] if a != "--cpu"]
        how = f"run: {shlex.join(fixed)}"
    else:
        how = f"run: accelerate launch --multi_gpu --num_processes {asked} <script> ..."
    raise ConfigError(f"accelerate launch started ONE process, not the {asked} asked for ({why}"
                      f"). For {asked} CPU processes (gloo; the recipe picks it when no GPU is "
                      f"visible) {how}")


def check_launcher_settings(mixed_precision: str, accumulation: int,
                            environ: Mapping[str, str] | None = None) -> None:
    """Launcher settings that the recipe's knobs override: refused when they differ.

    `accelerate launch --mixed_precision X` reaches the script as ACCELERATE_MIXED_PRECISION,
    `--gradient_accumulation_steps N` as ACCELERATE_GRADIENT_ACCUMULATION_STEPS; the recipe
    passes its own knobs to ``Accelerator(...)``, which win. "no" is also what the launcher
    sets when the flag is not given, so only another value is a request."""
    env = os.environ if environ is None else environ
    launcher_mp = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launcher_mp not in ("no", mixed_precision):
        raise ConfigError(
            f"accelerate launch --mixed_precision {launcher_mp} is not used by this recipe: its "
            f"precision is the recipe's knob --mixed_precision (here {mixed_precision!r}). Drop "
            f"the launcher flag and pass --mixed_precision {launcher_mp} after the script name "
            f"(fp16 and fp8 are refused there, with the reason).")
    launcher_acc = env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if launcher_acc is not None and launcher_acc.isdigit() and int(launcher_acc) != accumulation:
        raise ConfigError(
            f"the launcher asks for {launcher_acc} gradient accumulation steps but the recipe's "
            f"knob --gradient_accumulation_steps is {accumulation} (the recipe's wins, and "
            f"--batch_size is global): pass --gradient_accumulation_steps {launcher_acc} after "
            f"the script name instead.")


def quiet_libraries() -> None:
    """Library chatter silenced once per process, through each library's own switch, after
    its import (transformers and DeepSpeed reset their loggers' levels when imported): rank 0
    keeps their warnings, every other rank their errors only, so each warning prints once."""
    import datasets
    import transformers

    main = is_main()
    datasets.disable_progress_bars()  # one progress bar: the training steps
    transformers.utils.logging.disable_progress_bar()
    (transformers.utils.logging.set_verbosity_warning if main else
     transformers.utils.logging.set_verbosity_error)()
    level = logging.WARNING if main else logging.ERROR
    for name in ("datasets", "accelerate", "filelock", "matplotlib", "torch.distributed"):
        logging.getLogger(name).setLevel(level)
    if "deepspeed" in sys.modules or str(os.environ.get(
            "ACCELERATE_USE_DEEPSPEED", "")).lower() == "true":
        from deepspeed.utils import logger as ds_logger  # "Setting ds_accelerator to ..."

        ds_logger.setLevel(level)
    if not main:
        warnings.filterwarnings("ignore")  # one copy of each Python warning: rank 0's


def _launched() -> bool:
    """Whether this process was started by a launcher that reports a non-zero child with a
    traceback (accelerate launch, torchrun)."""
    return any(n in " ".join(parent_command()[:3]) for n in _LAUNCHERS)


def _first_to_stop() -> bool:
    """True in the first process of this machine's launch to call it (an exclusive file named
    after the launcher's pid and start time, so a later launcher with the same pid has its own).

    Ctrl-C reaches every rank, but a rank blocked inside a collective (gloo's C++ side) handles
    it only when the collective returns, which it never does once a peer stopped: so the rank
    that handles it FIRST, whichever it is, says the one line and ends the others."""
    if not _launched():
        return True
    try:
        import psutil

        started = psutil.Process(os.getppid()).create_time()
    except Exception:  # noqa: BLE001  (psutil missing or the launcher gone: one rank decides)
        return int(os.environ.get("LOCAL_RANK", "0")) == 0
    path = os.path.join(tempfile.gettempdir(), f"recipes_stop_{os.getppid()}_{started:.0f}")
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _end_launch(code: int, ender: bool | None = None) -> None:
    """End the launcher that started this process and its other ranks, then this process.

    Only where the parent is a launcher that would print a traceback for a non-zero child
    (accelerate launch, torchrun); only the ``ender`` does it (default: the local rank 0, one
    per machine); the others wait to be ended."""
    if ender is None:
        ender = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if _launched() and ender:
        try:
            import psutil

            parent = psutil.Process(os.getppid())
            siblings = [p for p in parent.children(recursive=True) if p.pid != os.getpid()]
            parent.kill()  # first: it must not see a sibling's status and start its report
            for p in siblings:
                p.kill()
        except Exception:  # noqa: BLE001  (psutil missing or a process gone: exit anyway)
            pass
    elif _launched():
        time.sleep(30)  # the ender ends this process; if it cannot, exit after all
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_main(name: str, fn: Callable[[], Any]) -> None:
    """Run ``fn``: a refused setup is one line from rank 0 and exit status 2, Ctrl-C one line
    and 130, on every rank of the launch; any other error keeps its traceback. Only rank 0
    writes to standard output."""
    interrupted = []

    def on_sigint(signum: int, frame: Any) -> None:
        interrupted.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    if not is_main():
        # Only rank 0 prints. Libraries that print instead of logging (DeepSpeed's
        # "deepspeed_shm_comm_op built successfully" when its communication backend starts, in
        # Accelerator() or TrainingArguments) would print once per rank: the other ranks'
        # standard output goes nowhere, for the life of the process (errors and tracebacks are
        # on stderr).
        sys.stdout = open(os.devnull, "w")
    try:
        fn()
    except (ConfigError, ABConfigError) as exc:
        if is_main():
            print(f"{name}: error: {exc}", file=sys.stderr, flush=True)
        _end_launch(2)
    except BaseException as exc:  # noqa: BLE001
        if not interrupted and not isinstance(exc, KeyboardInterrupt):
            raise
        first = _first_to_stop()
        if first:
            ckpt = PROGRESS["checkpoints"] and latest_checkpoint(PROGRESS["checkpoints"])
            print(f"{name}: interrupted at step {PROGRESS['step']}; " + (
                f"last checkpoint {ckpt} (--resume_from_checkpoint {ckpt})" if ckpt else
                "no checkpoint written (--checkpointing_steps N writes them)"),
                file=sys.stderr, flush=True)
        _end_launch(130, ender=first)
