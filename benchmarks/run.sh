#!/usr/bin/env bash
# The benchmark suite: `make bench` runs `bash benchmarks/run.sh full`, `make bench-quick` runs
# `bash benchmarks/run.sh quick` (under 10 minutes on a 2-core machine). Extra arguments are
# passed to every compare.py call (e.g. --model cnn).
#
#   full:  every method x 3 seeds x 300 steps, for each model (mlp; the recipes' vit and resnet),
#          on one machine and on a 100 Mbit/s link between two network namespaces; projection
#          at 2..64 nodes; plots and tables; BENCHMARKS.md's generated tables.
#   quick: the same methods and models, 1 seed x 150 steps.
#
#   fine-tuning (python -m benchmarks.finetune): full fine-tuning, AB (paper defaults, the
#          fine-tuning options, the frozen residual), LoRA, PiSSA and GaLore on a pretrained
#          byte-level LM; full: 3 seeds, and the 7.87M model (--large: 3 seeds, 100 steps);
#          quick: --quick (1 seed, a smaller model, a few minutes).
#   DeepSpeed (python -m benchmarks.deepspeed_zero): AB at ZeRO 0, 1, 2 and 2 + offload against
#          DeepSpeed's own ZeRO 2: optimizer state per rank, bytes, accuracy (1 minute).
#
# Results: benchmarks/results/{,quick_}<model>_{local,netns}.json, {,quick_}projection.json,
# finetune{,_quick,_large}.json, {quick_,}deepspeed_zero.json, *_acc_vs_*.png, *_table.md. The rate-limited part needs root and
# iproute2; without them it is skipped with a
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

# `local` is the zero-communication clock (not a training method): every method's exposed
# communication is its step time minus local's, measured in the same world.
METHODS=local,ddp,ddp-bf16,ab-with-stale,ab-with-stale-bf16,powersgd-r2,diloco
# the recipes' shapes: configs/vit_digits.yaml (hidden 64, 4 blocks), configs/resnet_digits.yaml
MODELS=("mlp" "vit --width 64 --depth 4" "resnet --channels 16")
case "$MODE" in
    full)
        PREFIX=""
        LOCAL_ARGS=(--seeds 0,1,2 --steps 300 --one-world)
        NETNS_ARGS=(--seeds 0,1,2 --steps 300 --rate 100mbit --one-world)
        ;;
    quick)
        PREFIX="quick_"
        LOCAL_ARGS=(--seeds 0 --steps 150 --one-world)
        NETNS_ARGS=(--seeds 0 --steps 150 --rate 100mbit --one-world)
        ;;
    *)
        echo "usage: $0 full|quick [extra compare.py arguments]" >&2
        exit 2
        ;;
esac

echo "== machine: $(nproc --all) cores; load before: $(cut -d' ' -f1-3 /proc/loadavg)"
start=$SECONDS

for spec in "${MODELS[@]}"; do
    read -r model margs <<<"$spec"
    # shellcheck disable=SC2086  # margs is a list of flags
    echo "== $model, one machine (gloo over loopback); load $(cut -d' ' -f1-3 /proc/loadavg)"
    $PY -m benchmarks.compare --model $model $margs --methods "$METHODS" "${LOCAL_ARGS[@]}" \
        --out "$RESULTS/${PREFIX}${model}_local.json" "$@"
    echo "== $model, rate-limited link between two network namespaces"
    $PY -m benchmarks.compare --model $model $margs --netns --methods "$METHODS" \
        "${NETNS_ARGS[@]}" --out "$RESULTS/${PREFIX}${model}_netns.json" "$@"
done

echo "== projection to the paper's ImageNet schedules"
$PY -m benchmarks.projection --rank-fraction 0.1,0.2,0.3 \
    --from-results "$RESULTS/${PREFIX}mlp_local.json" --out "$RESULTS/${PREFIX}projection.json"

echo "== plots"
$PY benchmarks/plot.py "$RESULTS/${PREFIX}"*_local.json "$RESULTS/${PREFIX}"*_netns.json

echo "== BENCHMARKS.md's generated tables and targets"
$PY benchmarks/report.py --prefix "$PREFIX"

echo "== fine-tuning: AB (with the frozen residual) vs full fine-tuning, LoRA, PiSSA and GaLore (load $(cut -d' ' -f1-3 /proc/loadavg))"
if [ "$MODE" = full ]; then FINETUNE_ARGS=(); else FINETUNE_ARGS=(--quick); fi
$PY -m benchmarks.finetune "${FINETUNE_ARGS[@]}"
if [ "$MODE" = full ]; then $PY -m benchmarks.finetune --large; fi

echo "== DeepSpeed ZeRO 1/2 (bf16, offload) under the ab_training key (load $(cut -d' ' -f1-3 /proc/loadavg))"
if [ "$MODE" = full ]; then
    $PY -m benchmarks.deepspeed_zero
else
    $PY -m benchmarks.deepspeed_zero --seeds "[0]" --steps 60 --out "$RESULTS/quick_deepspeed_zero.json"
fi

echo "== done in $((SECONDS - start)) s; load after: $(cut -d' ' -f1-3 /proc/loadavg)"
