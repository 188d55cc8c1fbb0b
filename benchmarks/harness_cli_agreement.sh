#!/bin/bash
# `fedkt eval` (fedkt's scorer) vs `fedkt eval --harness` vs lm-eval's own CLI on the same ARC-Easy questions
# (the first N test documents), same model; docs/evaluation.md records a run. Needs pip install 'fedkt[harness]'.
#   benchmarks/harness_cli_agreement.sh DATA_DIR [N=300] [OUT=/tmp/harness-agreement] [MODEL_DIR]
# (run it through the machine's heavy-job queue; OMP_NUM_THREADS as you set it)
set -u
cd "$(dirname "$0")/.."
DATA=$(realpath "$1"); N=${2:-300}; R=${3:-/tmp/harness-agreement}; M=${4:-$HOME/.cache/fedkt/smollm2-135m}
PY=${PYTHON:-python}   # LM_EVAL: the lm_eval command of the same environment
export PYTHONPATH=src HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
mkdir -p "$R/first$N/arc_easy" && head -"$N" "$DATA/arc_easy/test.jsonl" > "$R/first$N/arc_easy/test.jsonl"
echo "start $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
/usr/bin/time -f 'wall %e s' $PY -m fedkt.cli eval --model "$M" --tasks arc_easy --data-dir "$R/first$N" \
    --batch-size 32 --json "$R/fedkt_scorer.json" > "$R/fedkt_scorer.log" 2>&1
echo "scorer done $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
/usr/bin/time -f 'wall %e s' $PY -m fedkt.cli eval --model "$M" --harness arc_easy_local --include-path examples/harness \
    --data-dir "$DATA" --limit "$N" --batch-size 32 --json "$R/fedkt_harness.json" > "$R/fedkt_harness.log" 2>&1
echo "harness done $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
/usr/bin/time -f 'wall %e s' ${LM_EVAL:-lm_eval} --model hf --model_args "pretrained=$M,dtype=float32" --device cpu \
    --batch_size 32 --include_path examples/harness --tasks arc_easy_local --metadata "{\"data_dir\": \"$DATA\"}" \
    --limit "$N" --output_path "$R/lm_eval_direct" > "$R/lm_eval_direct.log" 2>&1
echo "direct done $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
tail -n 2 "$R/fedkt_scorer.log" "$R/fedkt_harness.log"; grep -A3 "^|  *Tasks" "$R/lm_eval_direct.log"
