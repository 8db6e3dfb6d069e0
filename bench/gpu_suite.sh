#!/usr/bin/env bash
# Every GPU figure of the benchmark in one command: Qwen3-8B's shapes with all 36 layers, on one H100 / H200.
#
#   bash bench/gpu_suite.sh OUT_DIR            # on the GPU machine (the parts' limits add up to 550 s)
#   PYTHON=.venv/bin/python bash bench/gpu_suite.sh OUT_DIR --quick --threads 1   # toy sizes, on a CPU
#
# In the order of the targets they judge (a part cut short by its limit leaves the others' figures):
# 1. profile: ours' training step and decode step under torch.profiler (top ops, launches, synchronisations)
# 2. train: both shapes, LoRA and DoRA, ours vs the tuned reference (the better reference in every earlier run):
#    step times, DoRA / LoRA, peak memory, MFU, the loss and gradient parity checks
# 3. generate: LoRA; ours with CUDA graphs, eager (its greedy captions must equal the graphs'), merged into bf16,
#    and the reference
# 4. grid-estimate: E1-E8 on one GPU from 2 and 3 (validation with merged weights, which cost the same for both)
# 5. extra: DoRA's generation, DoRA with dropout 0 and the QLoRA-recipe reference at the resampler shape
# The random bf16 snapshot (16 GB at 36 layers) is drawn on the GPU and written once, to /dev/shm when it has
# room (memory, not disk); every part reads it from there. Everything printed is also in OUT_DIR/suite.log.
set -uo pipefail
out=${1:?usage: bash bench/gpu_suite.sh OUT_DIR [--quick] [--threads N]}
shift
extra=("$@")
python=${PYTHON:-python3}
preset=qwen3-8b
quick=$([[ " ${extra[*]} " == *" --quick "* ]] && echo -quick)
shm_kib=$(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 {print $4}')
base=$([ "${shm_kib:-0}" -gt $((20 * 1024 * 1024)) ] && echo /dev/shm || echo /tmp)
snapshots=$base/kovlm-bench-$preset$quick
mkdir -p "$out"
export PYTHONUNBUFFERED=1
log="$out/suite.log"
: > "$log"

part() {  # part NAME SECONDS COMMAND...: one part under its own limit; the suite goes on when it fails
  local name=$1 limit=$2
  shift 2
  echo "=== $name: $* (limit ${limit} s)" | tee -a "$log"
  local started=$SECONDS
  timeout "$limit" "$@" 2>&1 | grep --line-buffered -v "kernels-community" | tee -a "$log"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - started)) s" | tee -a "$log"
}

model=("$python" -m bench model --preset $preset --snapshot-dir "$snapshots")

echo "kovlm GPU suite: $(date -u), snapshots in $snapshots, $($python -c 'import torch; print(torch.__version__,
  torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")')" | tee -a "$log"
part profile 90 $python -m bench profile --preset $preset --snapshot-dir "$snapshots" --json "$out/profile.json" \
  "${extra[@]}"
part train 240 "${model[@]}" --tasks train --stacks ours,tuned --methods lora,dora --json "$out/train.json" \
  "${extra[@]}"
part generate 140 "${model[@]}" --tasks generate --methods lora --json "$out/generate.json" "${extra[@]}"
part grid-estimate 20 $python -m bench grid-estimate "$out/train.json" "$out/generate.json" \
  --generation ours-merged --json "$out/grid.json"
part extra 60 "${model[@]}" --tasks generate,train --methods dora,dora-d0 --shapes resampler \
  --stacks ours,reference,tuned --generate-runs ours,reference --json "$out/extra.json" "${extra[@]}"
cp "$snapshots/workers.log" "$out/workers.log" 2>/dev/null
echo "kovlm GPU suite: done $(date -u), $SECONDS s" | tee -a "$log"
