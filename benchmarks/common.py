"""Helpers shared by the benchmarks and the tests (nothing AB-specific): a free local port for
a launcher, a JSON results file written atomically, and the summary statistics of repeated runs.

Import as ``benchmarks.common`` from the repository root (``python -m benchmarks.<script>``, or
under pytest, whose ``pythonpath`` holds the root).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
from typing import Any


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for ``--master_port`` / ``--main_process_port``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 1) -> None:
    """Write ``data`` as JSON to ``path`` atomically: into ``<path>.tmp``, then renamed, so a
    reader (or a run that died mid-write) never sees half a file."""
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=indent)
    os.replace(tmp, path)


def stats(values: list[float | None]) -> dict[str, float] | None:
    """Mean, sample standard deviation (0 for one value), min, max and count of the values
    that are not None (None when there are none)."""
    kept = [v for v in values if v is not None]
    if not kept:
        return None
    return {"mean": statistics.fmean(kept),
            "std": statistics.stdev(kept) if len(kept) > 1 else 0.0,
            "min": min(kept), "max": max(kept), "n": len(kept)}


__all__ = ["free_port", "write_json", "stats"]
