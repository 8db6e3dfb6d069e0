"""Where one training step's memory goes, tensor by tensor (`python -m bench --tasks memory`, measured by
bench/workers.py's memory worker; bench/memory.py is the LM's weights and a snapshot's load).

A training step is profiled in three ways at once:
- torch.profiler with profile_memory records every allocation and free of the step with the op that made it;
  forward hooks on every module open a profiler range named after it, so each allocation has a module (in
  backward too: a checkpointed layer's recompute runs its forward hooks again). The peak of the live bytes made
  during the step, and what is live at that moment, grouped: saved for backward (by module), the rest of the
  forward, backward (recompute and gradients of activations), the parameters' gradients.
- torch.autograd.graph.saved_tensors_hooks tells which of those tensors autograd saved for backward.
- the process's resident set (VmRSS / VmHWM), by kind of mapping (/proc/self/smaps: weights files a loader left
  mapped, other files such as the libraries' code, anonymous memory) and glibc's malloc statistics (mallinfo2):
  the memory that is resident but in no tensor (the allocator's free lists, the tokenizer, Python objects).
What was resident before the step (parameters, optimizer state) is counted from the model itself. Last, one
forward with checkpointing off counts what autograd saves for backward in every layer, by module group.
"""
import ctypes
import re
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from lora import QWEN3_LINEARS

MIB = 2 ** 20
LINEAR_BACKWARDS = ("AdaptedLinearFunctionBackward", "MatMul4BitBackward")  # ours, and bitsandbytes' under PEFT
LOSS_OPS = ("HeadCrossEntropy", "log_softmax", "nll_loss", "cross_entropy", "logsumexp", "LogSoftmax", "NllLoss")



# ---- what is resident before a step ----------------------------------------------------------------------------
def storage_mib(tensors) -> float:
    """MiB of the distinct storages under `tensors` (views and tied weights once)."""
    sizes = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.device.type != "meta"}
    return sum(sizes.values()) / MIB


def resident_tensors(modules, optimizer) -> dict:
    """MiB held before a step: frozen weights (4-bit ones with their quantization statistics), trainable
    parameters, optimizer state. Grouped by kind, not module: both stacks hold the same tensors."""
    frozen_4bit, frozen, trainable = [], [], []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad:
                trainable.append(p)
            elif hasattr(p, "quant_state"):  # bitsandbytes Params4bit: packed weights + absmax (+ nested) stats
                frozen_4bit.append(p)
                frozen_4bit += quant_state_tensors(p.quant_state)
            else:
                frozen.append(p)
        frozen += list(module.buffers())
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return {"frozen full-precision weights (embedding, lm_head, norms)": storage_mib(frozen),
            "  of which on a weights file's memory map": on_file_maps(frozen),
            "frozen 4-bit weights and their statistics": storage_mib(frozen_4bit),
            "trainable parameters (adapters, projector)": storage_mib(trainable),
            "optimizer state (AdamW)": storage_mib(state)}


def quant_state_tensors(state) -> list[torch.Tensor]:
    if state is None:
        return []
    found = [t for t in (state.absmax, getattr(state, "code", None), getattr(state, "offset", None))
             if torch.is_tensor(t)]
    return found + quant_state_tensors(getattr(state, "state2", None))


# ---- the kernel's view: resident memory by kind of mapping ------------------------------------------------------
def memory_maps() -> list[tuple[int, int, str, float]]:
    """(start, end, path, resident MiB) of every mapping of this process (/proc/self/smaps); path "" for
    anonymous memory, "[heap]" for the brk heap."""
    maps = []
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \S+\s*(.*)$", line)
        if head:
            maps.append([int(head.group(1), 16), int(head.group(2), 16), head.group(3).strip(), 0.0])
        elif line.startswith("Rss:"):
            maps[-1][3] += int(line.split()[1]) / 1024  # kB
    return [tuple(m) for m in maps]


def resident_by_mapping() -> dict:
    """Resident MiB by kind: weights files mapped by a loader (*.safetensors: a tensor left on the map is
    resident only where it was read), other files (libraries' code and data, paged in as they are used), and
    anonymous memory (the heap, large allocations, Python's arenas)."""
    kinds = defaultdict(float)
    for _, _, path, rss in memory_maps():
        kind = "anonymous" if not path or path.startswith("[") else \
            "weights files" if path.endswith(".safetensors") else "other files"
        kinds[kind] += rss
    return dict(kinds)


def on_file_maps(tensors) -> float:
    """MiB of the distinct storages under `tensors` that lie in a file's memory map (a loader that did not copy)."""
    files = [(start, end) for start, end, path, _ in memory_maps() if path.startswith("/")]
    sizes = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(size for ptr, size in sizes.items() if any(start <= ptr < end for start, end in files)) / MIB


# ---- glibc's view: what the allocator holds that no tensor does ------------------------------------------------
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def malloc_stats() -> dict | None:
    """glibc's mallinfo2 in MiB: the heap arenas (in use and free-but-kept) and the separately mmapped blocks
    (large allocations, returned to the system when freed); None where the C library is not glibc >= 2.33."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = MallInfo2
    info = mallinfo2()
    return {"arena_mib": info.arena / MIB, "arena_in_use_mib": info.uordblks / MIB,
            "arena_free_mib": info.fordblks / MIB, "mmapped_mib": info.hblkhd / MIB}


# ---- one step, allocation by allocation ------------------------------------------------------------------------
class ModuleRanges:
    """Forward hooks that open a profiler range `module:<name>` around every module's forward, and keep the
    current module's name for the saved-tensor hook."""

    def __init__(self, roots):
        self.stack, self.handles = [], []
        for root_name, root in roots.items():
            for name, module in root.named_modules():
                full = f"{root_name}.{name}" if name else root_name
                self.handles.append(module.register_forward_pre_hook(self.enter_hook(full)))
                self.handles.append(module.register_forward_hook(self.exit_hook(), always_call=True))

    def enter_hook(self, name):
        def hook(module, args):
            record = torch.autograd.profiler.record_function(f"module:{name}")
            record.__enter__()
            self.stack.append((name, record))
        return hook

    def exit_hook(self):
        def hook(module, args, output):
            name, record = self.stack.pop()
            record.__exit__(None, None, None)
        return hook

    def current(self) -> str:
        return self.stack[-1][0] if self.stack else "(outside any module)"

    def remove(self):
        for handle in self.handles:
            handle.remove()


def module_group(name: str) -> str:
    """A module path, ours or PEFT's, as one of a few groups: the projector, the embedding, the lm_head and loss,
    and inside the decoder layers the 4-bit base linears, the adapters, and the rest (attention, norms, MLP)."""
    if "projector" in name:
        return "projector"
    if "embed_tokens" in name:
        return "embedding"
    if "lm_head" in name:
        return "lm_head and loss"
    inside = re.search(r"layers\.\d+\.(.*)", name)
    if not inside:
        return "outside the decoder layers"
    parts = inside.group(1).split(".")
    if parts[-1] in ("base", "base_layer"):
        return "decoder: 4-bit base linears"
    if any(p.startswith("lora_") or p == "dropout" or p in QWEN3_LINEARS for p in parts):
        return "decoder: adapters (LoRA / DoRA)"
    return "decoder: attention, norms, MLP activation"


def allocation_group(node) -> tuple[str, str]:
    """(phase, group) of one allocation event: forward or backward, and the innermost module range above it,
    else the op (a loss op, a backward function)."""
    phase, module, ops = "forward", None, []
    parent = node.parent
    while parent is not None:
        name = parent.name
        if name == "phase:backward":
            phase = "backward"
        elif name.startswith("module:") and module is None:
            module = name.removeprefix("module:")
        else:
            ops.append(name)
        parent = parent.parent
    if any(op in name for name in ops for op in LOSS_OPS):
        return phase, "lm_head and loss"
    if module is not None:
        return phase, module_group(module)
    backward = next((name.split(": ", 1)[1] for name in ops if name.startswith("autograd::engine")), None)
    if backward in LINEAR_BACKWARDS:
        return phase, "decoder linears' backward (base and adapter)"
    return phase, f"other ({backward or (ops[-1] if ops else 'no op')})"


def profile_step(loss_of_batch, finish, roots: dict, parameters, device) -> dict:
    """One step (loss_of_batch(), its backward, then finish(): the optimizer step and zero_grad) under the
    allocation profiler and the saved-tensor hook. Returns the peak of the bytes allocated on `device` during the
    step and still live, what is live at that peak by (phase, group), the bytes saved for backward by group."""
    ranges, saved = ModuleRanges(roots), {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        saved.setdefault(storage.data_ptr(), (storage.nbytes(), module_group(ranges.current())))
        return tensor
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as trace:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                loss = loss_of_batch()
            with torch.autograd.profiler.record_function("phase:backward"):
                loss.backward()
            del loss
            gradients = {p.grad.untyped_storage().data_ptr() for p in parameters if p.grad is not None}
            finish()
    finally:
        ranges.remove()
    live, total, peak, at_peak = {}, 0, 0, {}
    for ptr, size, node in allocation_events(trace.profiler.kineto_results.experimental_event_tree(), device):
        if size > 0:
            live[ptr] = (size, node)
            total += size
        elif ptr in live:  # a free of a tensor made before the step (the previous step's leftovers) is not ours
            total -= live.pop(ptr)[0]
        if total > peak:
            peak, at_peak = total, dict(live)
    groups = defaultdict(float)
    for ptr, (size, node) in at_peak.items():
        phase, group = allocation_group(node)
        if ptr in gradients:
            key = "parameters' gradients"
        elif ptr in saved and phase == "forward":
            key = f"saved for backward: {saved[ptr][1]}"
        else:
            key = f"{phase}: {group}"
        groups[key] += size / MIB
    saved_by_group = defaultdict(float)
    for size, group in saved.values():
        saved_by_group[group] += size / MIB
    return {"tensor_peak_mib": peak / MIB, "at_peak_mib": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
            "saved_for_backward_mib": dict(sorted(saved_by_group.items(), key=lambda kv: -kv[1]))}


def saved_by_module(loss_of_batch, roots: dict) -> dict:
    """MiB that autograd saves for backward in one forward, by module group: run with checkpointing off, so each
    decoder layer's saves are seen (with it on they live only while that layer is recomputed, one at a time)."""
    ranges, saved = ModuleRanges(roots), {}
    weights = {t.untyped_storage().data_ptr() for root in roots.values()
               for t in [*root.parameters(), *root.buffers()]}  # saving a weight for backward costs nothing more

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved.setdefault(storage.data_ptr(), (storage.nbytes(), module_group(ranges.current())))
        return tensor
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = loss_of_batch()
        del loss
    finally:
        ranges.remove()
    groups = defaultdict(float)
    for size, group in saved.values():
        groups[group] += size / MIB
    return dict(sorted(groups.items(), key=lambda kv: -kv[1]))


def allocation_events(tree, device) -> list[tuple]:
    """(address, signed size, node) of every allocation (+) and free (-) on `device` in the profiler's event
    tree, in time order."""
    found, stack = [], list(tree)
    while stack:
        node = stack.pop()
        fields = node.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation" and fields.device.type == device.type:
            found.append((node.start_time_ns, fields.ptr, fields.alloc_size, node))
        stack.extend(node.children)
    return [(ptr, size, node) for _, ptr, size, node in sorted(found, key=lambda event: event[0])]
