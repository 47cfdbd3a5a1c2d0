"""The fine-tuning benchmark's corpora: the Python standard library's modules (pretraining)
and its test suite (fine-tuning, one file in ``heldout_every`` held out), as byte windows."""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path
from typing import Any

from benchmarks.finetune_settings import TEST_DIRS, Settings


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(kind: str) -> list[Path]:
    """The files of a corpus, sorted by path: ``"pretrain"`` (stdlib modules outside
    site-packages and the test folders) or ``"finetune"`` (the stdlib's ``test/`` package)."""
    root = stdlib_root()
    out = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if parts[0] == "site-packages" or not path.is_file():
            continue
        if kind == "finetune" and parts[0] == "test":
            out.append(path)
        elif kind == "pretrain" and not TEST_DIRS.intersection(parts[:-1]):
            out.append(path)
    if not out:
        raise RuntimeError(f"no {kind} corpus under {root}: this Python installation ships "
                           f"without its standard library sources (or without test/).")
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def _path_hash(path: Path) -> int:
    rel = path.relative_to(stdlib_root()).as_posix()
    return int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big")


def split_finetune_files(heldout_every: int) -> tuple[list[Path], list[Path]]:
    """(train, held-out) files of the fine-tuning corpus: a file is held out when the hash of
    its path is 0 modulo ``heldout_every`` (stable across machines and file additions)."""
    train, held = [], []
    for path in corpus_files("finetune"):
        (held if _path_hash(path) % heldout_every == 0 else train).append(path)
    return train, held


def read_bytes(files: list[Path]) -> bytes:
    """The files' bytes, one after the other (a newline between two files)."""
    return b"\n".join(p.read_bytes() for p in files)


def corpus_digest(files: list[Path]) -> str:
    """A SHA-256 of the files' relative paths and contents (what the pretrained model saw)."""
    h = hashlib.sha256()
    root = stdlib_root()
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def window_starts(n_bytes: int, seq_len: int, count: int, seed: int) -> list[int]:
    """``count`` random window starts in a text of ``n_bytes`` bytes, drawn from ``seed``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_bytes - seq_len, (count,), generator=g).tolist()


def spread_starts(n_bytes: int, seq_len: int, count: int) -> list[int]:
    """``count`` evenly spaced window starts covering the text (the held-out windows)."""
    if n_bytes < seq_len * count:
        count = max(1, n_bytes // seq_len)
    stride = (n_bytes - seq_len) / max(1, count - 1)
    return [round(i * stride) for i in range(count)]


class ByteWindows:
    """A torch Dataset of causal-LM windows of a byte string: input_ids = labels = the bytes
    (transformers shifts the labels), vocabulary 256."""

    def __init__(self, data: bytes, starts: list[int], seq_len: int) -> None:
        import torch

        self.data = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        self.starts = starts
        self.seq_len = seq_len

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.starts[i]
        ids = self.data[s:s + self.seq_len].long()
        return {"input_ids": ids, "labels": ids}


def finetune_datasets(s: Settings, seed: int) -> tuple[ByteWindows, ByteWindows]:
    """(train, held-out) datasets of the fine-tuning corpus. The train windows are drawn from
    ``seed``: every method of a seed sees the same windows in the same order (the Trainer's
    sampler is seeded with the same seed)."""
    train_files, held_files = split_finetune_files(s.heldout_every)
    train, held = read_bytes(train_files), read_bytes(held_files)
    n_train = s.steps * s.batch_size * s.nproc
    return (ByteWindows(train, window_starts(len(train), s.seq_len, n_train, seed), s.seq_len),
            ByteWindows(held, spread_starts(len(held), s.seq_len, s.eval_windows), s.seq_len))
