"""`python -m bench profile [--preset qwen3-8b] [--layers N] [--quick] [--json PATH]`: where a step's time goes.

torch.profiler records one training step (forward + backward + AdamW, bf16 autocast, LoRA, the resampler shape)
and one decode step (the CUDA-graph replay on a GPU, and the same step eagerly) of ours, after a warm-up of each,
and this prints for each: the top ops by self device time and by self host time, the kernel launches, and every
host-device synchronisation on the step's path. On a GPU the synchronisations are caught twice: torch's sync debug
mode (torch.cuda.set_sync_debug_mode) reports each synchronising call with the line of kovlm that made it, and the
trace counts the runtime's synchronise and device-to-host copy calls. On the CPU there is no device to wait for;
the ops that would synchronise on a GPU (.item(), .tolist(), nonzero, ...) are still counted from the trace, with
the caveat that on the host-side labels they do not wait for anything.
"""
import collections
import tempfile
import traceback
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from bench.snapshots import preset_for, write_snapshots
from bench.stacks import captions_of, features_of, ours_llm, stage2_vlm
from decode import decode_one_token
from lora import after_optimizer_step

# ops that make the host wait for the device when their input lives there
SYNC_OPS = ("aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::masked_select", "aten::unique",
            "aten::_unique2", "aten::is_nonzero", "aten::repeat_interleave")
RUNTIME_SYNCS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpy ")
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")
TOP = 12
# the ATen ops behind .item() / .tolist() / bool(tensor), data-dependent shapes, and device-to-host copies
SYNCING_ATEN = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "repeat_interleave")


class SyncRecorder(TorchDispatchMode):
    """Every op of SYNCING_ATEN, and every copy to the CPU from another device, with the device of its input and
    where it was called from (the innermost line in kovlm, and the innermost line anywhere): on a GPU input each
    one waits for the device."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        to_host = name in ("_to_copy", "copy_") and first is not None and first.device.type != "cpu" and \
            str((kwargs or {}).get("device", args[0].device if name == "copy_" else "")) == "cpu"
        if name in SYNCING_ATEN or to_host:
            device = first.device.type if first is not None else "-"
            self.calls[f"aten::{name} on {device} from {kovlm_frame()} ({innermost_frame()})"] += 1
        return func(*args, **(kwargs or {}))


def bench_profile(args) -> dict:
    preset = preset_for(args.preset, args.quick, args.layers)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="kovlm-profile-") as temporary:
        root = Path(args.snapshot_dir or temporary)
        folders = write_snapshots(preset, root, device)
        vlm = stage2_vlm(preset, folders, device, "resampler", ours_llm(folders, device, "lora"))
        result = {"preset": preset.name, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
                  else "cpu", "train_step": profile_train_step(preset, vlm, device),
                  **profile_decode_steps(preset, vlm, device)}
    for phase in ("train_step", "decode_step", "decode_step_eager"):
        if phase in result:
            print_summary(phase, result[phase])
    return result


def profile_train_step(preset, vlm, device) -> dict:
    features = features_of(preset, preset.short_batch, preset.patches, device)
    captions = captions_of(vlm, preset.short_batch, preset.caption_tokens)
    optimizer = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=1e-5)
    vlm.train()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = vlm(features, captions)
        loss.backward()
        optimizer.step()
        after_optimizer_step(vlm.llm)
        optimizer.zero_grad(set_to_none=True)
    return profiled(step, device)


def profile_decode_steps(preset, vlm, device) -> dict:
    """One decode step at batch preset.generate_batch after a prefill: as generate runs it (a graph replay on a
    GPU) and eagerly (the same static step, op by op)."""
    vlm.eval()
    features = features_of(preset, preset.generate_batch, preset.patches, device)
    B, results = preset.generate_batch, {}
    with torch.no_grad():
        visual = vlm.project(features)
        embeds = vlm.llm.model.embed_tokens(vlm.prompt_ids(B, visual.shape[1]).to(device))
        T = embeds.shape[1]
        decoder = vlm.decoder_for(B, T + preset.new_tokens)
        token = decoder.prefill(embeds).argmax(-1)  # (B,)
        if decoder.use_graph:  # profiled() steps once first: that captures the graph; the profiled step replays it
            results["decode_step"] = profiled(lambda: decoder.step(token), device)
        position = torch.tensor([T + 1], device=device)  # the eager step writes slot T + 1 of the same cache
        results["decode_step_eager"] = profiled(
            lambda: decode_one_token(vlm.llm, decoder.cache, token[:, None], position), device)
    return results


def profiled(run, device) -> dict:
    """run() once to warm up, once under the SyncRecorder, then once under the profiler (and on a GPU under the
    sync debug mode): the recorder's Python hook on every op would swell the profiled host time."""
    run()
    recorder = SyncRecorder()
    with recorder:
        run()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    caught = collections.Counter()
    with profile(activities=activities) as trace, warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *rest: caught.update([f"{message} at {kovlm_frame()}"])
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
            synchronize(device)
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
    return summarize(trace.key_averages(), device, caught) | {"sync_calls": dict(recorder.calls)}


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def kovlm_frame() -> str:
    """The innermost stack frame in kovlm's own files: the line that asked for the synchronisation."""
    root = Path(__file__).resolve().parents[1]
    frames = [f for f in traceback.extract_stack() if f.filename.startswith(str(root)) and "site-packages" not in
              f.filename and "bench/profile" not in f.filename]  # a virtualenv inside the checkout is not kovlm
    return f"{Path(frames[-1].filename).relative_to(root)}:{frames[-1].lineno}" if frames else "outside kovlm"


def innermost_frame() -> str:
    """The innermost stack frame outside torch's internals (a torch.optim step counts), as file:line."""
    frames = [f for f in traceback.extract_stack() if "<" not in f.filename and
              ("/torch/" not in f.filename or "/torch/optim/" in f.filename) and
              not f.filename.endswith(("bench/profile.py", "_python_dispatch.py"))]
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "-"


def summarize(events, device, caught: collections.Counter) -> dict:
    """Top ops by self device and self host time, launches, and the synchronising ops and calls."""
    def top(key):
        ranked = sorted((e for e in events if getattr(e, key) > 0), key=lambda e: -getattr(e, key))[:TOP]
        return [{"op": e.key, "ms": getattr(e, key) / 1000, "calls": e.count} for e in ranked]
    counts = {e.key: e.count for e in events}
    return {"top_device": top("self_device_time_total") if device.type == "cuda" else [],
            "top_host": top("self_cpu_time_total"),
            "host_ms": sum(e.self_cpu_time_total for e in events) / 1000,
            "kernel_launches": sum(n for key, n in counts.items() if key in LAUNCHES),
            "sync_ops": {key: counts[key] for key in SYNC_OPS if key in counts},
            "runtime_syncs": {key: n for key, n in counts.items() if key.startswith(RUNTIME_SYNCS)},
            "sync_debug": dict(caught)}


def print_summary(phase: str, summary: dict) -> None:
    print(f"\n## {phase}: host {summary['host_ms']:.1f} ms (self, all ops), {summary['kernel_launches']} kernel "
          f"launches")
    for key, title in (("top_device", "self device time"), ("top_host", "self host time")):
        if summary[key]:
            print(f"top ops by {title}:")
            for op in summary[key]:
                print(f"  {op['ms']:9.3f} ms  {op['calls']:6d} x  {op['op']}")
    print(f"ops that synchronise on a GPU input (profiler counts): {summary['sync_ops'] or 'none'}")
    print("each such call, its input's device and its caller:" + ("".join(
        f"\n  {n:4d} x  {call}" for call, n in summary["sync_calls"].items()) or " none"))
    print(f"runtime synchronise calls: {summary['runtime_syncs'] or 'none'}")
    print(f"sync debug mode: {summary['sync_debug'] or 'none caught'}")
