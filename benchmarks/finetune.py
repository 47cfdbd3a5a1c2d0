"""Fine-tuning: AB-training against full fine-tuning, LoRA and GaLore, on the same run.

A byte-level causal LM (transformers' Llama architecture, built from a config, ~2M parameters)
is PRETRAINED here on one real corpus that ships with the machine's software, the Python
standard library's own modules (every ``*.py`` under ``sysconfig.get_paths()["stdlib"]``
outside ``site-packages`` and the test folders), saved with ``save_pretrained`` and cached on
disk under a hash of everything that decides it (corpus, model, pretraining knobs). Each method
then loads it with ``from_pretrained``, as a user's model would be, and FINE-TUNES it on a
disjoint corpus, the standard library's test suite (``test/``): one file in
``heldout_every`` (by a hash of its path) is held out, the held-out loss and perplexity are
measured on fixed windows of those files. Nothing is downloaded at any point.

Methods (:class:`Method`), 4 gloo processes under torchrun, the same data order, steps, LR
schedule and seeds for every one (each is a ``transformers.Trainer`` or a subclass):

* ``full``: full fine-tuning, the plain Trainer + DDP, AdamW;
* ``ab-paper``: :class:`ab_accel.trainer.ABTrainer` with the paper's defaults (rank cutoff
  0.15, with-stale, groups of world/2) on the paper's schedule scaled to the run
  (:func:`benchmarks.compare.ab_schedule_for`: a dense warm-up of ~10% of the run, four
  cycles, rebound 5% of a cycle, LR rebound 20% of a cycle);
* ``ab-energy``: the same schedule, rank by retained spectral energy (``rank_energy``);
* ``ab-lean``: ``lean_memory`` (no dense step: factorized at step 0, no rebound, switches layer
  by layer) at a ``fixed_rank``; ``ab-lean-energy``: the same with ``rank_energy``;
* ``lora``: peft's LoRA (rank ``lora_r``) on the attention and MLP projections, the plain
  Trainer + DDP;
* ``galore``: the Trainer's own ``optim="galore_adamw"`` (galore-torch) on the same layers.

Every method targets the same layers (q, k, v, o, gate, up, down projections); embeddings,
norms and the LM head are trained densely by the full-rank methods and frozen by LoRA.

What is measured, per rank, over ``trainer.train()`` (see benchmarks/finetune_worker.py):
held-out loss and perplexity (mean and spread over the seeds), bytes per rank (the AB meter;
for the DDP methods the gradient buckets DDP handed its comm hook, counted with
:class:`ab_accel.ddp.DDPTraffic`) and the DP-equivalent (the bytes DDP all-reduces for
full fine-tuning of the same model over the same steps), peak training-state memory
(parameters + gradients + optimizer state, walked at every optimizer step), peak RSS and steps
per second.

    python benchmarks/finetune.py                      # the full run: 3 seeds
    python benchmarks/finetune.py --quick              # 1 seed, a smaller model, a few minutes
    python benchmarks/finetune.py --report_only true   # table and plot from the results file

Results: ``benchmarks/results/finetune.json`` (``finetune_quick.json``), ``*_table.md`` (the
table BENCHMARKS.md shows, from :func:`markdown_table`) and ``*.png`` (held-out loss against
bytes per rank and against peak training-state memory).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser

from ab_accel.cli import field_help

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.compare import ab_schedule_for, machine  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
#: The layers every method adapts (Llama's attention and MLP projections).
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: Folders of the standard library that hold tests: never in the pretraining corpus.
TEST_DIRS = {"test", "tests", "idle_test"}
MB = 1e6


class Method(str, Enum):
    """The fine-tuning methods the benchmark compares (their names in the results file)."""

    FULL = "full"
    AB_PAPER = "ab-paper"
    AB_ENERGY = "ab-energy"
    AB_LEAN = "ab-lean"
    AB_LEAN_ENERGY = "ab-lean-energy"
    LORA = "lora"
    GALORE = "galore"

    def __str__(self) -> str:
        return self.value

    @property
    def is_ab(self) -> bool:
        return self.value.startswith("ab-")


def knob(default: Any, help: str) -> Any:
    """A dataclass field that carries its help text (as ABConfig's fields do)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: list(default) if isinstance(default, list)
                     else dict(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class Settings:
    """Every knob of the benchmark (the full run's defaults; ``--quick`` swaps in QUICK)."""

    methods: list[str] = knob([str(m) for m in Method], "Methods to run, in order: "
                              + ", ".join(str(m) for m in Method) + ".")
    seeds: list[int] = knob([0, 1, 2], "Seeds (LoRA init, data order); one world trains each.")
    nproc: int = knob(4, "Processes (gloo ranks) in the fine-tuning world.")
    steps: int = knob(200, "Fine-tuning optimizer steps.")
    batch_size: int = knob(4, "Windows per rank per step (global batch: x nproc).")
    seq_len: int = knob(128, "Bytes per window (the context length).")
    lr: float = knob(1e-3, "Peak LR of the full-rank methods (full, AB, GaLore): AdamW.")
    lora_lr: float = knob(3e-3, "Peak LR of LoRA (its usual higher LR, see BENCHMARKS.md).")
    weight_decay: float = knob(0.0, "AdamW weight decay.")
    lr_warmup_ratio: float = knob(0.05, "Linear LR warm-up share of the steps, then cosine.")
    max_grad_norm: float = knob(1.0, "Gradient clipping (of the reduced gradients).")
    eval_windows: int = knob(256, "Held-out windows of seq_len bytes (spread over the files).")
    heldout_every: int = knob(10, "One fine-tuning file in this many is held out (by hash).")
    hidden_size: int = knob(192, "Model width.")
    intermediate_size: int = knob(512, "MLP width.")
    num_layers: int = knob(4, "Decoder layers.")
    num_heads: int = knob(4, "Attention heads.")
    pretrain_steps: int = knob(800, "Pretraining optimizer steps (one process).")
    pretrain_batch_size: int = knob(8, "Pretraining windows per step.")
    pretrain_lr: float = knob(2e-3, "Pretraining peak LR (AdamW, cosine).")
    pretrain_threads: int = knob(1, "torch threads of the pretraining process (2 threads "
                                    "ran 3x slower than 1 on a loaded 2-core machine).")
    ab_energy: float = knob(0.99, "rank_energy of ab-energy and ab-lean-energy.")
    ab_fixed_rank: int = knob(32, "fixed_rank of ab-lean.")
    ab_lean_cycles: int = knob(4, "AB cycles of the lean methods (sync_every = steps / this).")
    lora_r: int = knob(16, "LoRA rank.")
    lora_alpha: int = knob(32, "LoRA alpha (scale alpha / r).")
    galore_rank: int = knob(48, "GaLore projection rank.")
    galore_update_proj_gap: int = knob(50, "GaLore: steps between projector updates (SVDs).")
    galore_scale: float = knob(1.0, "GaLore scale of the projected update.")
    one_world: bool = knob(False, "Train every method in one world of processes (saves a "
                                  "start-up per method; peak RSS is then shared).")
    cache_dir: str = knob("~/.cache/ab_accel/finetune_bench", "Where pretrained models are "
                                                               "cached (one folder per hash).")
    out: str = knob(str(RESULTS / "finetune.json"), "Results JSON (table and plot beside it).")
    timeout: float = knob(3600.0, "Seconds one world may take.")
    report_only: bool = knob(False, "Only redraw the table and plot from the results file.")

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in {str(x) for x in Method}]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}: choose from "
                             f"{', '.join(str(m) for m in Method)}.")
        self.methods = [Method(m) for m in self.methods]
        problems = [what for ok, what in [
            (bool(self.methods) and bool(self.seeds), "methods and seeds must each name one"),
            (self.nproc >= 2 and self.nproc % 2 == 0, "nproc must be even and >= 2 (AB's "
             "A-groups and B-groups)"),
            (self.steps >= 16, "steps must be >= 16 (the scaled AB schedule needs 4 cycles)"),
            (self.hidden_size % self.num_heads == 0, "hidden_size must divide by num_heads"),
            (self.steps % self.ab_lean_cycles == 0, "steps must divide by ab_lean_cycles"),
        ] if not ok]
        if problems:
            raise ValueError("; ".join(problems) + ".")

    @property
    def lr_warmup_steps(self) -> int:
        return max(1, round(self.lr_warmup_ratio * self.steps))


#: The quick variant (``--quick``): one seed, a smaller model and shorter runs, in one world.
QUICK: dict[str, Any] = {
    "seeds": [0], "steps": 40, "batch_size": 4, "seq_len": 64, "eval_windows": 64,
    "hidden_size": 64, "intermediate_size": 176, "num_layers": 2, "num_heads": 4,
    "pretrain_steps": 200, "pretrain_batch_size": 16, "ab_fixed_rank": 8, "lora_r": 8,
    "lora_alpha": 16, "galore_rank": 16, "galore_update_proj_gap": 10, "one_world": True,
    "out": str(RESULTS / "finetune_quick.json"),
}


# ---------------------------------------------------------------------------- the corpora
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


# ---------------------------------------------------------------------------- the model
def model_config(s: Settings) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=256, hidden_size=s.hidden_size,
                       intermediate_size=s.intermediate_size, num_hidden_layers=s.num_layers,
                       num_attention_heads=s.num_heads, num_key_value_heads=s.num_heads,
                       max_position_embeddings=s.seq_len, tie_word_embeddings=False,
                       bos_token_id=None, eos_token_id=None, pad_token_id=None)


def pretrain_key(s: Settings, digest: str) -> str:
    """The cache key of the pretrained model: a hash of what decides its weights."""
    import torch
    import transformers

    decided = {k: getattr(s, k) for k in ("hidden_size", "intermediate_size", "num_layers",
                                          "num_heads", "seq_len", "pretrain_steps",
                                          "pretrain_batch_size", "pretrain_lr")}
    decided.update(corpus=digest, torch=torch.__version__, transformers=transformers.__version__)
    return hashlib.sha256(json.dumps(decided, sort_keys=True).encode()).hexdigest()[:16]


def training_arguments(output_dir: str, **overrides: Any) -> Any:
    """The TrainingArguments every run here shares (CPU, no checkpoints, no trackers)."""
    from transformers import TrainingArguments

    base = dict(output_dir=output_dir, use_cpu=True, lr_scheduler_type="cosine",
                logging_steps=10, save_strategy="no", report_to="none", disable_tqdm=True,
                dataloader_num_workers=0, per_device_eval_batch_size=32)
    return TrainingArguments(**{**base, **overrides})


def pretrain(s: Settings) -> dict[str, Any]:
    """The pretrained model's folder (built here if not cached) and how it was made."""
    import torch
    from transformers import LlamaForCausalLM, Trainer

    files = corpus_files("pretrain")
    digest = corpus_digest(files)
    folder = Path(os.path.expanduser(s.cache_dir)) / f"pretrained-{pretrain_key(s, digest)}"
    info_path = folder / "pretraining.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        print(f"[finetune] pretrained model from the cache: {folder}", flush=True)
        return {**info, "path": str(folder), "cached": True}
    print(f"[finetune] pretraining on {len(files)} stdlib modules, {s.pretrain_steps} steps "
          f"-> {folder}", flush=True)
    torch.set_num_threads(s.pretrain_threads)
    text = read_bytes(files)
    n = s.pretrain_steps * s.pretrain_batch_size
    data = ByteWindows(text, window_starts(len(text), s.seq_len, n, seed=12345), s.seq_len)
    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config(s))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ab-pretrain-") as tmp:
        args = training_arguments(tmp, per_device_train_batch_size=s.pretrain_batch_size,
                                  max_steps=s.pretrain_steps, learning_rate=s.pretrain_lr,
                                  warmup_steps=max(1, s.pretrain_steps // 20), weight_decay=0.1,
                                  max_grad_norm=1.0, seed=0, logging_steps=50)
        trainer = Trainer(model=model, args=args, train_dataset=data)
        out = trainer.train()
        seconds = time.perf_counter() - t0
        _, held = finetune_datasets(s, seed=0)
        heldout = trainer.evaluate(eval_dataset=held)["eval_loss"]
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
        model.save_pretrained(staging)
        info = {"key": folder.name, "corpus": "stdlib modules (no tests)", "files": len(files),
                "bytes": len(text), "corpus_sha256": digest, "steps": s.pretrain_steps,
                "batch_size": s.pretrain_batch_size, "seq_len": s.seq_len, "lr": s.pretrain_lr,
                "seconds": seconds, "train_loss_first": losses[0] if losses else None,
                "train_loss_last": losses[-1] if losses else None,
                "train_loss": out.training_loss,
                "finetune_heldout_loss_before": heldout,
                "parameters": sum(p.numel() for p in model.parameters()),
                "loadavg_after": list(os.getloadavg())}
        (staging / "pretraining.json").write_text(json.dumps(info, indent=1))
        try:
            os.replace(staging, folder)  # atomic: a folder in the cache is always complete
        except OSError:  # another run put it there first
            subprocess.run(["rm", "-rf", str(staging)], check=False)
    return {**info, "path": str(folder), "cached": False}


# ---------------------------------------------------------------------------- the runs
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_world(s: Settings, methods: list[Method], model_path: str) -> list[dict[str, Any]]:
    """torchrun ``nproc`` ranks of benchmarks/finetune_worker.py for ``methods`` (every seed);
    return rank 0's records (one per method and seed, every rank's numbers inside)."""
    with tempfile.TemporaryDirectory(prefix="ab-finetune-") as tmp:
        spec = {"settings": _settings_dict(s), "methods": [str(m) for m in methods],
                "model_path": model_path, "out": os.path.join(tmp, "world.json"),
                "work_dir": tmp}
        spec_path = os.path.join(tmp, "spec.json")
        Path(spec_path).write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
               str(s.nproc), "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               str(HERE / "finetune_worker.py"), spec_path]
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=s.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # our own torchrun and its ranks only
            proc.wait()
            raise RuntimeError(f"the world of {methods} ran past {s.timeout} s") from None
        if rc != 0 or not os.path.exists(spec["out"]):
            raise RuntimeError(f"the world of {[str(m) for m in methods]} failed (exit {rc}); "
                               f"its ranks' errors are above")
        return json.loads(Path(spec["out"]).read_text())


def _settings_dict(s: Settings) -> dict[str, Any]:
    d = dataclasses.asdict(s)
    d["methods"] = [str(m) for m in s.methods]
    return d


def ab_schedules(s: Settings) -> dict[str, dict[str, Any]]:
    """The AB methods' ABConfig keywords (one place: the worker builds its configs from it)."""
    paper = ab_schedule_for(s.steps)
    scaled = {"warmup_steps": paper["ab_warmup"], "sync_every": paper["ab_sync_every"],
              "rebound_steps": paper["ab_rebound"], "lr_rebound_steps": paper["ab_lr_rebound"],
              "rank_cutoff": 0.15, "sync_mode": "with-stale", "target_modules": TARGET_MODULES}
    t = s.steps // s.ab_lean_cycles
    lean = {"warmup_steps": 0, "sync_every": t, "rebound_steps": 0,
            "lr_rebound_steps": max(1, round(0.2 * t)), "lean_memory": True,
            "sync_mode": "with-stale", "target_modules": TARGET_MODULES}
    return {str(Method.AB_PAPER): scaled,
            str(Method.AB_ENERGY): {**scaled, "rank_energy": s.ab_energy},
            str(Method.AB_LEAN): {**lean, "fixed_rank": s.ab_fixed_rank},
            str(Method.AB_LEAN_ENERGY): {**lean, "rank_energy": s.ab_energy}}


def describe(method: Method, s: Settings) -> str:
    """One line on what a method is, for the table."""
    ab = ab_schedules(s).get(str(method))
    if method == Method.FULL:
        return "Trainer + DDP, AdamW"
    if method == Method.LORA:
        return f"peft LoRA r={s.lora_r}, alpha={s.lora_alpha}, lr {s.lora_lr:g}"
    if method == Method.GALORE:
        return (f"optim=galore_adamw, rank {s.galore_rank}, gap {s.galore_update_proj_gap}, "
                f"scale {s.galore_scale:g}")
    rule = (f"fixed_rank {ab['fixed_rank']}" if "fixed_rank" in ab else
            f"rank_energy {ab['rank_energy']}" if "rank_energy" in ab else
            f"rank_cutoff {ab['rank_cutoff']}")
    sched = f"W0={ab['warmup_steps']}, T={ab['sync_every']}, F={ab['rebound_steps']}, " \
            f"R={ab['lr_rebound_steps']}"
    return f"{rule}; {sched}" + ("; lean_memory" if ab.get("lean_memory") else "")


# ---------------------------------------------------------------------------- results
def spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


SUMMARY_KEYS = ("eval_loss", "perplexity", "bytes", "wire_bytes", "dp_equivalent_bytes",
                "dp_equivalent_wire_bytes", "peak_state_bytes", "peak_rss_mb",
                "steps_per_second", "train_seconds", "trained_params_per_step")


def summarize(seeds: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean, spread, min and max over the seeds of each number in SUMMARY_KEYS (per-rank
    numbers averaged over the ranks of a seed first; peaks are the max over the ranks)."""
    return {k: spread([float(r[k]) for r in seeds]) for k in SUMMARY_KEYS
            if all(r.get(k) is not None for r in seeds)}


def markdown_table(res: dict[str, Any]) -> str:
    """The results table of BENCHMARKS.md, from a results file (nothing typed by hand)."""
    full = res["methods"].get(str(Method.FULL))
    ref_loss = full["summary"]["eval_loss"]["mean"] if full else None
    ref_state = full["summary"]["peak_state_bytes"]["mean"] if full else None
    n = len(res["settings"]["seeds"])
    rows = [f"| method | held-out loss (mean ± std, {n} seed{'s' * (n > 1)}) | vs full | "
            "perplexity | MB sent/rank (wire) | vs DP-equivalent | peak state MB | vs full | "
            "peak RSS MB | steps/s | params trained/step | ranks kept | what |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in res["methods"].items():
        sm = m["summary"]
        loss, wire = sm["eval_loss"], sm["wire_bytes"]["mean"]
        dp = sm["dp_equivalent_wire_bytes"]["mean"]
        state = sm["peak_state_bytes"]["mean"]
        d_loss = f"{loss['mean'] - ref_loss:+.3f}" if ref_loss is not None else "-"
        d_state = f"{state / ref_state:.0%}" if ref_state else "-"
        rows.append(
            f"| {name} | {loss['mean']:.3f} ± {loss['std']:.3f} | {d_loss} | "
            f"{sm['perplexity']['mean']:.3f} | {wire / MB:.1f} | {wire / dp:.1%} | "
            f"{state / MB:.2f} | {d_state} | {sm['peak_rss_mb']['mean']:.0f} | "
            f"{sm['steps_per_second']['mean']:.2f} | "
            f"{sm['trained_params_per_step']['mean'] / 1e6:.2f}M | {m.get('ranks_kept', '-')} | "
            f"{m['what']} |")
    return "\n".join(rows) + "\n"


def markdown_run(res: dict[str, Any]) -> str:
    """The paragraphs on the run itself (data, model, knobs, machine load), from a results
    file: BENCHMARKS.md shows them above the table."""
    st, pre, fc = res["settings"], res["pretrained"], res["finetune_corpus"]
    mb, ma = res["machine_before"], res.get("machine_after", {})
    loads = [m["loadavg_before"][0] for m in res["methods"].values()] + [
        m["loadavg_after"][0] for m in res["methods"].values()]
    per_seed = "; ".join(
        f"{name} " + " / ".join(f"{r['eval_loss']:.3f}" for r in m["seeds"])
        for name, m in res["methods"].items())
    return (
        f"**The run.** A byte-level Llama ({pre['parameters'] / 1e6:.2f}M parameters: "
        f"{st['num_layers']} layers, width {st['hidden_size']}, MLP {st['intermediate_size']}, "
        f"{st['num_heads']} heads, vocabulary 256 bytes, context {st['seq_len']}) pretrained "
        f"here for {pre['steps']} steps of {pre['batch_size']} windows on {pre['files']} "
        f"standard-library modules ({pre['bytes'] / MB:.1f} MB, tests excluded; train loss "
        f"{pre['train_loss_first']:.2f} -> {pre['train_loss_last']:.2f}, {pre['seconds']:.0f} s), "
        f"then fine-tuned on the standard library's `test/` package: {fc['train_files']} files "
        f"({fc['train_bytes'] / MB:.1f} MB) to train on, {fc['heldout_files']} held out "
        f"({fc['heldout_bytes'] / MB:.1f} MB; {st['eval_windows']} windows of it are the "
        f"held-out set). The pretrained model's held-out loss before fine-tuning: "
        f"{pre['finetune_heldout_loss_before']:.3f} nats per byte. Fine-tuning: "
        f"{st['nproc']} gloo processes, {st['batch_size']} windows per rank, {st['steps']} "
        f"optimizer steps, AdamW, peak LR {st['lr']:g} (LoRA {st['lora_lr']:g}) with "
        f"{res['settings']['lr_warmup_ratio']:.0%} linear warm-up and cosine decay, clip "
        f"{st['max_grad_norm']:g}, weight decay {st['weight_decay']:g}; seeds "
        f"{', '.join(map(str, st['seeds']))} (same data order and LoRA init for every method "
        f"of a seed).\n\n"
        f"**The machine.** {mb.get('cpus')} cores ({mb.get('cpu', '?')}), Python "
        f"{mb.get('python')}, torch {mb.get('torch')}; shared with other engineers' tests: "
        f"load average {mb['loadavg'][0]:.1f} at the start, {ma.get('loadavg', [math.nan])[0]:.1f} "
        f"at the end, between {min(loads):.1f} and {max(loads):.1f} at the start and end of the "
        f"methods' worlds (each method's `loadavg_before` / `loadavg_after` in the JSON). Steps "
        f"per second and RSS are those of that loaded machine.\n\n"
        f"Held-out loss per seed: {per_seed}.\n")


def _ranks_kept(seeds: list[dict[str, Any]]) -> str | None:
    """The AB ranks of each factorization (seed 0): 'r0→r1→...' of the mean rank fraction."""
    facts = seeds[0].get("factorizations")
    if not facts:
        return None
    return "→".join(f"{f['rank_fraction']:.2f}" for f in facts)


def plot(res: dict[str, Any], path: str) -> str:
    """Held-out loss against bytes per rank and against peak training-state memory, one
    marker per method (mean over seeds; bars: min to max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    markers = "osD^v<>ph*"
    panels = [("wire_bytes", "MB sent per rank (ring estimate, log scale)", True),
              ("peak_state_bytes", "peak training state per rank (MB: params + grads + "
                                   "optimizer state)", False)]
    for ax, (key, label, log) in zip(axes, panels, strict=True):
        for i, (name, m) in enumerate(res["methods"].items()):
            sx, sy = m["summary"][key], m["summary"]["eval_loss"]
            ax.errorbar([sx["mean"] / MB], [sy["mean"]],
                        yerr=[[sy["mean"] - sy["min"]], [sy["max"] - sy["mean"]]],
                        xerr=[[(sx["mean"] - sx["min"]) / MB], [(sx["max"] - sx["mean"]) / MB]],
                        fmt=markers[i % len(markers)], markersize=8, capsize=3, label=name)
        before = res["pretrained"].get("finetune_heldout_loss_before")
        if before is not None:
            ax.axhline(before, color="grey", linestyle=":", linewidth=1,
                       label=f"pretrained, before fine-tuning ({before:.3f})")
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("held-out loss (nats per byte)")
    axes[1].legend(fontsize=8, loc="best")
    st = res["settings"]
    fig.suptitle(f"Fine-tuning a {res['pretrained']['parameters'] / 1e6:.1f}M-parameter byte "
                 f"LM on the stdlib's tests: {st['nproc']} ranks, {st['steps']} steps, seeds "
                 f"{st['seeds']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(res: dict[str, Any], out: str) -> list[str]:
    stem = os.path.splitext(out)[0]
    table = stem + "_table.md"
    Path(table).write_text(markdown_run(res) + "\n" + markdown_table(res))
    return [table, plot(res, stem + ".png")]


def _write(path: str, result: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    Path(tmp).write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- the command line
def parse(argv: list[str] | None = None) -> Settings:
    """The Settings of a run: defaults < ``--quick``'s preset < the other flags."""
    parser = ArgumentParser(prog="finetune.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="The quick variant: 1 seed, a smaller model, fewer steps.")
    parser.add_class_arguments(Settings, as_group=False)
    field_help(parser, Settings)  # jsonargparse reads docstrings only, not field metadata
    ns = parser.parse_args(argv)
    if ns.quick:
        parser.set_defaults(**QUICK)
        ns = parser.parse_args(argv)
    values = parser.instantiate(ns).as_dict()
    values.pop("quick")
    values.pop("__path__", None)
    return Settings(**values)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    s = parse(argv)
    if s.report_only:
        res = json.loads(Path(s.out).read_text())
        print("\n".join(f"[finetune] wrote {p}" for p in write_report(res, s.out)))
        return res
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    Path(s.out).parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "command": "python benchmarks/finetune.py " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "settings": _settings_dict(s), "machine_before": machine(), "methods": {}}
    train_files, held_files = split_finetune_files(s.heldout_every)
    result["finetune_corpus"] = {
        "what": "the stdlib's test/ package", "train_files": len(train_files),
        "heldout_files": len(held_files), "train_bytes": len(read_bytes(train_files)),
        "heldout_bytes": len(read_bytes(held_files)),
        "corpus_sha256": corpus_digest(train_files + held_files)}
    result["pretrained"] = pretrain(s)
    result["ab_configs"] = ab_schedules(s)
    worlds = [list(s.methods)] if s.one_world else [[m] for m in s.methods]
    for methods in worlds:
        t0 = time.time()
        load = list(os.getloadavg())
        print(f"[finetune] {','.join(map(str, methods))}: seeds {s.seeds}, {s.steps} steps, "
              f"{s.nproc} ranks; load {load}", flush=True)
        records = run_world(s, methods, result["pretrained"]["path"])
        for method in methods:
            seeds = [r for r in records if r["method"] == str(method)]
            m = {"what": describe(method, s), "seeds": seeds, "summary": summarize(seeds),
                 "world_seconds": time.time() - t0, "shared_world": len(methods) > 1,
                 "loadavg_before": load, "loadavg_after": list(os.getloadavg())}
            kept = _ranks_kept(seeds)
            if kept:
                m["ranks_kept"] = kept
            result["methods"][str(method)] = m
            sm = m["summary"]
            print(f"[finetune] {method}: held-out loss {sm['eval_loss']['mean']:.4f} "
                  f"+- {sm['eval_loss']['std']:.4f}, {sm['wire_bytes']['mean'] / MB:.1f} "
                  f"MB/rank, peak state {sm['peak_state_bytes']['mean'] / MB:.2f} MB, "
                  f"{sm['steps_per_second']['mean']:.2f} steps/s", flush=True)
        _write(s.out, result)  # partial results survive an interruption
    result["machine_after"] = machine()
    _write(s.out, result)
    for p in [s.out, *write_report(result, s.out)]:
        print(f"[finetune] wrote {p}", flush=True)
    return result


if __name__ == "__main__":
    main()
