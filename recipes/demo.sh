#!/usr/bin/env bash
# `make demo`: AB-training against plain data parallel, 4 CPU processes, sklearn's digits.
#
#   1. recipes/vit.py --no-ab   plain DDP, its traffic measured by a DDP comm hook
#   2. recipes/vit.py           AB-training, everything else identical, compared with run 1
#
# Both runs use `accelerate launch --multi_gpu --num_processes 4` (one gloo world on CPU; the
# recipe builds Accelerator(cpu=True) itself) and the default config, configs/vit_digits.yaml.
# Outputs: runs/demo/{dp,ab}/ (summary.json, plot.png, model/, metrics.jsonl, logs/).
# Knobs: NPROC=2 make demo; DEMO_ARGS="--epochs 6" make demo; DEMO_OUT=/tmp/demo make demo.
set -euo pipefail

cd "$(dirname "$0")/.."
NPROC="${NPROC:-4}"
OUT="${DEMO_OUT:-runs/demo}"
read -r -a EXTRA <<< "${DEMO_ARGS:-}"

# Offline, CPU, one BLAS thread per process: the 4 processes share the machine's cores.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TRANSFORMERS_OFFLINE=1 DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false

launch() {
    accelerate launch --multi_gpu --num_processes "$NPROC" --num_machines 1 \
        --mixed_precision no --dynamo_backend no "$@"
}

start=$(date +%s)
echo "== 1/2: plain data parallel (--no-ab), $NPROC CPU processes, sklearn digits"
launch recipes/vit.py --no-ab --output_dir "$OUT/dp" --report_to none "${EXTRA[@]}"
echo
echo "== 2/2: AB-training, $NPROC CPU processes, same data, model, optimizer and seed"
launch recipes/vit.py --output_dir "$OUT/ab" --baseline_run "$OUT/dp" "${EXTRA[@]}"

python - "$OUT" "$(( $(date +%s) - start ))" <<'EOF'
import json, sys

out, seconds = sys.argv[1], int(sys.argv[2])
ab = json.load(open(f"{out}/ab/summary.json"))
dp = json.load(open(f"{out}/dp/summary.json"))
t, c, b = ab["traffic"], ab["compression"], ab["baseline"]
mib = 2 ** 20
print(f"""
== demo summary ({ab['ranks']} CPU processes, sklearn digits, {ab['steps']} steps, {seconds} s)
   top-1 / top-5 (exported merged model)   AB {ab['accuracy']['top1']:.3f} / \
{ab['accuracy']['top5']:.3f}    DP {dp['accuracy']['top1']:.3f} / {dp['accuracy']['top5']:.3f}
   bytes on the wire, all ranks            AB {t['wire_bytes'] / mib:.1f} MiB    \
DP {dp['traffic']['wire_bytes'] / mib:.1f} MiB (measured, DDP comm hook)
   traffic reduction vs DP                 {100 * b['measured_reduction']:.1f}% against the \
measured DDP run, {100 * t['reduction_vs_dp']:.1f}% against the exact DP count
   compression (factorized layers)         {c['factorized_ratio']:.2f}:1 \
({c['ratio']:.2f}:1 whole model), {c['of']}
   plot                                    {ab['plot']}
   DP plot                                 {dp['plot']}
   merged model (plain transformers)       {ab['export']['dir']}""")
EOF
