"""Run a function in N real gloo processes and collect what each rank returns.

No mocks: every rank is a separate OS process with its own torch.distributed world on a free
local port. Results come back through files written with torch.save.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.common import free_port  # one copy for the tests and the benchmarks

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def script_env(*dirs: str, **extra: str) -> dict[str, str]:
    """``os.environ`` (plus ``extra``) for a script a test launches (torchrun, accelerate
    launch, deepspeed): PYTHONPATH starts with ``dirs``, the repository root and tests/, so
    the script imports this checkout's ab_accel, the tests' helpers and ``benchmarks`` without
    editing sys.path."""
    path = [*dirs, ROOT, TESTS, os.environ.get("PYTHONPATH", "")]
    return {**os.environ, **extra, "PYTHONPATH": os.pathsep.join(p for p in path if p)}


def run_or_dump(cmd: list[str], timeout: float, env: dict[str, str], **kwargs: Any
                ) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd)`` with captured text output, and a diagnosis when it hangs: past
    ``timeout`` every process it started gets SIGABRT, whose faulthandler (PYTHONFAULTHANDLER)
    prints each Python thread's stack, and the test fails with the end of that output."""
    proc = subprocess.Popen(cmd, env={**env, "PYTHONFAULTHANDLER": "1"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGABRT)
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        raise AssertionError(f"{cmd[:4]} ... hung for {timeout} s; the stacks at SIGABRT:\n"
                             f"{out[-2000:]}\n{err[-12000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def end_process(code: int = 0) -> None:
    """Leave a test process whose results are written: destroy the process groups while the
    interpreter is whole (after a garbage collection, so no optimizer or DDP wrapper keeps one
    alive), say so on stderr, and exit without the interpreter's teardown.

    Twice in many runs one rank of a test run died with SIGABRT from gloo's C++ side
    ("terminate called without an active exception"), which fails the whole run; where in the
    process was not seen (the scripts printed nothing). The interpreter's teardown, with process
    groups still referenced, is where such aborts are known to happen, so it is left out here; a
    failure before this point still fails the run, and the ``finished`` lines on stderr now say
    which ranks got this far. Every rank calls it (the barrier)."""
    gc.collect()
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    gc.collect()
    print(f"rank {rank}: finished", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def _worker(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple,
            out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, path)
    except BaseException:  # report every failure to the parent, with its traceback
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    end_process()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any,
                    timeout: float = 300) -> list[Any]:
    """``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; returns the results by rank.

    ``fn`` must be importable (a module-level function) because the ranks are spawned.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_worker, args=(world_size, free_port(), fn, args, out_dir),
                                 nprocs=world_size, join=False, start_method="spawn")
        try:
            while not ctx.join(timeout=timeout):
                pass
        except Exception as exc:
            errors = []
            for r in range(world_size):
                p = os.path.join(out_dir, f"rank{r}.pt")
                if os.path.exists(p):
                    rec = torch.load(p, weights_only=False)
                    if not rec["ok"]:
                        errors.append(f"--- rank {r} ---\n{rec['error']}")
            raise RuntimeError("distributed run failed:\n" + "\n".join(errors)) from exc
        results = []
        for r in range(world_size):
            rec = torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
            results.append(rec["result"])
        return results
