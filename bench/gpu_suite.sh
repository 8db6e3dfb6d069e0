#!/usr/bin/env bash
# Every GPU figure of the benchmark in one command: Qwen3-8B's shapes with all 36 layers, on one H100 / H200.
#
#   bash bench/gpu_suite.sh OUT_DIR            # on the GPU machine (aimed at under ten minutes)
#   PYTHON=.venv/bin/python bash bench/gpu_suite.sh OUT_DIR --quick --threads 1   # toy sizes, on a CPU
#
# 1. profile: ours' training step and decode step under torch.profiler (top ops, launches, synchronisations)
# 2. train: both shapes, LoRA and DoRA, ours vs the tuned reference (the better one in every earlier run)
# 3. generate: LoRA and DoRA, ours with CUDA graphs / eager / merged bf16 weights vs the reference, greedy captions
#    compared
# 4. grid-estimate: E1-E8 on one GPU from 2 and 3
# 5. extra: DoRA with dropout 0 against both references, and the QLoRA-recipe reference's LoRA step, at the
#    resampler shape (last: the first four are the targets)
# The random bf16 snapshot (16 GB at 36 layers) is drawn on the GPU and written once to /dev/shm (memory, not
# disk); every step reads it from there. Each step has its own time limit so one that hangs leaves the others'
# figures; everything printed is also in OUT_DIR/suite.log.
set -uo pipefail
out=${1:?usage: bash bench/gpu_suite.sh OUT_DIR [--quick] [--threads N]}
shift
extra=("$@")
python=${PYTHON:-python3}
preset=qwen3-8b
snapshots=$([ -d /dev/shm ] && echo /dev/shm || echo /tmp)/kovlm-bench-$preset$( [[ " ${extra[*]} " == *" --quick "* ]] && echo -quick)
mkdir -p "$out"
export PYTHONUNBUFFERED=1
log="$out/suite.log"
: > "$log"

step() {  # step NAME SECONDS COMMAND...: run one part under its own limit; the suite goes on if it fails
  local name=$1 limit=$2
  shift 2
  echo "=== $name: $* (limit ${limit} s)" | tee -a "$log"
  local started=$SECONDS
  timeout "$limit" "$@" 2>&1 | grep --line-buffered -v "kernels-community" | tee -a "$log"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - started)) s" | tee -a "$log"
}

echo "kovlm GPU suite: $(date -u), $($python -c 'import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")')" | tee -a "$log"
step profile 150 $python -m bench profile --preset $preset --snapshot-dir "$snapshots" --json "$out/profile.json" "${extra[@]}"
step train 210 $python -m bench model --preset $preset --snapshot-dir "$snapshots" --tasks train --stacks ours,tuned \
  --methods lora,dora --json "$out/train.json" "${extra[@]}"
step generate 150 $python -m bench model --preset $preset --snapshot-dir "$snapshots" --tasks generate \
  --stacks ours,reference --methods lora,dora --json "$out/generate.json" "${extra[@]}"
step grid-estimate 30 $python -m bench grid-estimate "$out/train.json" "$out/generate.json" --json "$out/grid.json"
step extra 120 $python -m bench model --preset $preset --snapshot-dir "$snapshots" --tasks train --shapes resampler \
  --stacks ours,reference,tuned --methods lora,dora-d0 --json "$out/extra.json" "${extra[@]}"
cp "$snapshots/workers.log" "$out/workers.log" 2>/dev/null
echo "kovlm GPU suite: done $(date -u), $SECONDS s" | tee -a "$log"
