"""kovlm's side-by-side benchmark, off the teaching path: ours against transformers + PEFT + bitsandbytes.

    python -m bench --preset cpu-small         # = python -m bench model --preset cpu-small
    python -m bench adapters | memory SNAPSHOT | model ... | profile ... | grid-estimate RESULTS_JSON...
    bash bench/gpu_suite.sh OUT_DIR            # every GPU figure in one command (Qwen3-8B, 36 layers)

cli.py holds the command line and the worker processes; snapshots.py the presets and random snapshot folders;
stacks.py ours and the reference stack; workers.py one measurement each; table.py rows, ratios and targets;
adapters.py the layer-level adapters benchmark; memory.py the LM's weights and one snapshot's load; step_memory.py
where a training step's memory goes; profile.py the profiler summary of a training and a decode step; grid.py the
E1-E8 projection; pruning.py and reduction.py token reduction's cost (standalone.py runs them as python -m).
"""
from bench.cli import main
from bench.snapshots import PRESETS, preset_for, write_snapshots
from bench.stacks import full_logits_loss

__all__ = ["main", "PRESETS", "preset_for", "write_snapshots", "full_logits_loss"]
