#!/usr/bin/env bash
# The benchmark suite: `make bench` runs `bash benchmarks/run.sh full`, `make bench-quick` runs
# `bash benchmarks/run.sh quick` (under 10 minutes on a 2-core machine). Extra arguments are
# passed to every compare.py call (e.g. --model cnn).
#
#   full:  every method x 3 seeds x 600 steps, on one machine and on a 100 Mbit/s link between
#          two network namespaces; projection at 2..64 nodes; plots and tables.
#   quick: DDP, AB with-stale, PowerSGD rank 2 and post-local SGD, 1 seed x 200 steps, on one
#          machine; DDP and AB with-stale on the limited link; projection; plots.
#
#   fine-tuning (benchmarks/finetune.py): full fine-tuning, AB (paper defaults and the
#          fine-tuning options), LoRA and GaLore on a pretrained byte-level LM; full: 3 seeds,
#          quick: --quick (1 seed, a smaller model, a few minutes).
#
# Results: benchmarks/results/{,quick_}{local,netns,projection}.json, *_acc_vs_*.png,
# *_table.md. The rate-limited part needs root and iproute2; without them it is skipped with a
# message (the JSON says why). The namespaces are removed on exit, whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=${1:-quick}
shift || true
PY=${PYTHON:-python}
RESULTS=benchmarks/results
mkdir -p "$RESULTS"

cleanup() { bash benchmarks/netns.sh down >/dev/null 2>&1 || true; }
trap cleanup EXIT INT TERM

export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

case "$MODE" in
    full)
        PREFIX=""
        LOCAL_ARGS=(--seeds 0,1,2 --steps 600)
        NETNS_ARGS=(--seeds 0,1,2 --steps 600 --rate 100mbit)
        NETNS_METHODS=ddp,ab-with-stale,ab-only-learned,ab-only-b,powersgd-r2,powersgd-r8,localsgd
        LOCAL_METHODS=$NETNS_METHODS
        ;;
    quick)
        PREFIX="quick_"
        LOCAL_ARGS=(--seeds 0 --steps 200 --one-world)
        NETNS_ARGS=(--seeds 0 --steps 200 --rate 100mbit --one-world)
        LOCAL_METHODS=ddp,ab-with-stale,powersgd-r2,localsgd
        NETNS_METHODS=ddp,ab-with-stale
        ;;
    *)
        echo "usage: $0 full|quick [extra compare.py arguments]" >&2
        exit 2
        ;;
esac

echo "== machine: $(nproc) cores; load before: $(cut -d' ' -f1-3 /proc/loadavg)"
start=$SECONDS

echo "== one machine (gloo over loopback)"
$PY benchmarks/compare.py --methods "$LOCAL_METHODS" "${LOCAL_ARGS[@]}" \
    --out "$RESULTS/${PREFIX}local.json" "$@"

echo "== rate-limited link between two network namespaces"
$PY benchmarks/compare.py --netns --methods "$NETNS_METHODS" "${NETNS_ARGS[@]}" \
    --out "$RESULTS/${PREFIX}netns.json" "$@"

echo "== projection to the paper's ImageNet schedules"
$PY benchmarks/projection.py --rank-fraction 0.1,0.2,0.3 \
    --from-results "$RESULTS/${PREFIX}local.json" --out "$RESULTS/${PREFIX}projection.json"

echo "== plots"
$PY benchmarks/plot.py "$RESULTS/${PREFIX}local.json" "$RESULTS/${PREFIX}netns.json"

echo "== fine-tuning: AB vs full fine-tuning, LoRA and GaLore (load $(cut -d' ' -f1-3 /proc/loadavg))"
if [ "$MODE" = full ]; then FINETUNE_ARGS=(); else FINETUNE_ARGS=(--quick); fi
$PY benchmarks/finetune.py "${FINETUNE_ARGS[@]}"

echo "== done in $((SECONDS - start)) s; load after: $(cut -d' ' -f1-3 /proc/loadavg)"
