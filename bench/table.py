"""The model benchmark's table: one row per measure, ours beside the reference and the tuned reference, the
ratios, and the targets each ratio is judged against (not judged at --quick's toy sizes).
"""
from functools import partial

from bench.snapshots import Preset
from bench.stacks import GRADIENT_TOLERANCE, LABEL_LOSS_TOLERANCE, STACKS

METHOD_NAMES = {"lora": "LoRA", "dora": "DoRA", "dora-d0": "DoRA (dropout 0)"}
# ours / the best reference; a target (op, bound) is judged on the ratio that holds against both references
STEP_TARGETS = {"lora": ("<=", 0.8), "dora": ("<=", 0.5), "dora-d0": ("<=", 0.5)}  # median training step time
MEMORY_TARGET = ("<=", 0.6)  # peak training memory (CPU: above the libraries' own resident memory)
CAPTIONS_PER_S_TARGET = (">=", 1.5)  # batched greedy generation
DORA_OVER_LORA_TARGET = 1.15  # ours' DoRA step / ours' LoRA step


def ratio_row(preset, shape, measure, values: dict, target: tuple | None = None, fmt="{:.0f}") -> dict:
    """A table row: ours, reference, tuned reference and ours / each. A target (op, value) is judged against
    the better of the two references, so a met target holds against the best the reference can do."""
    ours = values["ours"]
    ratios = {stack: ours / values[stack] for stack in STACKS[1:] if values.get(stack)}
    row = {"preset": preset, "shape": shape, "measure": measure,
           **{stack: values.get(stack) for stack in STACKS},
           "ours/reference": ratios.get("reference"), "ours/tuned": ratios.get("tuned"), "format": fmt}
    if target and ratios:  # (a run of ours alone has nothing to judge)
        op, bound = target
        judged = (max if op == "<=" else min)(ratios.values())  # the ratio against the better reference
        met = judged <= bound if op == "<=" else judged >= bound
        row |= {"target": f"ours/best {op} {bound}", "verdict": verdict(met)}
    return row


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def train_rows(preset: Preset, shape: str, methods: dict, device) -> list[dict]:
    """One training shape: per method the parity rows, step time, tokens/s, peak memory (on a GPU, LoRA's MFU);
    with both methods measured, ours' DoRA step over its LoRA step."""
    first = next(iter(methods.values()))["ours"]
    label, rows = f"{shape}: B {first['batch']} x T {first['length']}", []
    row = partial(ratio_row, preset.name, label)
    for method, runs in methods.items():
        name = METHOD_NAMES[method]
        rows += parity_rows(row, name, runs)
        rows.append(row(f"{name} step (ms)", {k: 1000 * v["median_s"] for k, v in runs.items()}, STEP_TARGETS[method]))
        rows.append(row(f"{name} tokens/s", {k: v["tokens_per_s"] for k, v in runs.items()}))
        peak = {k: v["peak_mib"] for k, v in runs.items()}
        rows.append(row(f"{name} peak memory (MiB)", peak, MEMORY_TARGET if device.type == "cuda" else None))
        if device.type == "cpu":  # what max_memory_allocated counts on a GPU: the tensors, not the libraries' code
            rows.append(row(f"{name} peak memory above the libraries (MiB)",
                            {k: peak[k] - v["libraries_mib"] for k, v in runs.items()}, MEMORY_TARGET))
        if device.type == "cuda" and method == "lora":
            rows.append(row("LoRA MFU (%)", {k: 100 * v["mfu"] for k, v in runs.items() if v["mfu"]}, fmt="{:.1f}"))
    if not {"lora", "dora"} <= set(methods):
        return rows
    dora_over_lora = {k: methods["dora"][k]["median_s"] / methods["lora"][k]["median_s"] for k in methods["lora"]
                      if k in methods["dora"]}
    return rows + [row("DoRA step / LoRA step", dora_over_lora, fmt="{:.2f}") |
                   {"target": f"ours <= {DORA_OVER_LORA_TARGET}",
                    "verdict": verdict(dora_over_lora["ours"] <= DORA_OVER_LORA_TARGET)}]


def parity_rows(row, name: str, runs: dict) -> list[dict]:
    """The check before timing: mean loss (dropout off), the mean per-label |difference| from ours (must stay under
    the tolerance), and in ours' column how far the adapters move the per-label losses (must be well above)."""
    difference = {k: v.get("mean_difference") for k, v in runs.items()} | {"ours": runs["ours"]["adapter_effect"]}
    rows = [row(f"{name} loss, dropout off", {k: v["loss"] for k, v in runs.items()}, fmt="{:.4f}"),
            row(f"{name} per-label loss, mean abs. difference from ours (ours: adapters on vs off)", difference,
                fmt="{:.4f}") |
            {"ours/reference": None, "ours/tuned": None, "target": f"<= {LABEL_LOSS_TOLERANCE}",
             "verdict": verdict(all(d <= LABEL_LOSS_TOLERANCE for k, d in difference.items() if k != "ours"))}]
    gradients = {"ours": 0.0} | {k: v["gradient_difference"] for k, v in runs.items() if "gradient_difference" in v}
    if len(gradients) > 1:
        rows.append(row(f"{name} adapter gradients, relative L2 difference from ours", gradients, fmt="{:.4f}") |
                    {"ours/reference": None, "ours/tuned": None, "target": f"<= {GRADIENT_TOLERANCE}",
                     "verdict": verdict(all(d <= GRADIENT_TOLERANCE for d in gradients.values()))})
    return rows


def generate_rows(preset: Preset, methods: dict) -> list[dict]:
    """Per method: the parity rows, captions/s (ours: the CUDA-graph step; also eager and with merged weights),
    time to first token, one decode step, peak memory, and how many greedy captions equal ours'."""
    label, rows = f"generation: B {preset.generate_batch}, {preset.new_tokens} new tokens", []
    row = partial(ratio_row, preset.name, label)
    for method, runs in methods.items():
        name, stacks = METHOD_NAMES[method], {k: v for k, v in runs.items() if k in STACKS}
        rows += parity_rows(row, name, {k: v for k, v in stacks.items() if k != "ours"} | {"ours": runs["ours"]})
        rows.append(row(f"{name} captions/s", {k: v["captions_per_s"] for k, v in stacks.items()},
                        CAPTIONS_PER_S_TARGET, "{:.2f}"))
        for variant, words in (("ours-eager", "eager decoding, no CUDA graph"),
                               ("ours-merged", "adapters merged into a bf16 copy")):
            if variant in runs:
                values = {k: v["captions_per_s"] for k, v in stacks.items()} | \
                         {"ours": runs[variant]["captions_per_s"]}
                rows.append(row(f"{name} captions/s, ours: {words}", values, CAPTIONS_PER_S_TARGET, "{:.2f}"))
        rows.append(row(f"{name} time to first token (ms)", {k: 1000 * v["first_token_s"] for k, v in stacks.items()}))
        rows.append(row(f"{name} decode step (ms), (all - first token) / (new tokens - 1)",
                        {k: 1000 * v["decode_step_s"] for k, v in stacks.items()}, fmt="{:.1f}"))
        rows.append(row(f"{name} peak memory (MiB)", {k: v["peak_mib"] for k, v in stacks.items()}))
        equal = {k: v["greedy_equal"] for k, v in runs.items() if "greedy_equal" in v}
        if equal:
            rows.append({"preset": preset.name, "shape": label, "format": "{}",
                         "measure": f"{name} greedy captions equal to ours' (fraction of rows): " +
                                    ", ".join(f"{k} {v:.2f}" for k, v in equal.items())})
    return rows


def loss_rows(preset: Preset, variants: dict) -> list[dict]:
    """Time and memory above the model, forward and forward + backward: label-only (ours) vs full logits."""
    ours, full = variants["label-only"], variants["full-logits"]
    label = f"caption loss: T {ours['length']}, C {preset.hidden_size}, V {preset.vocab_size}, " \
            f"{ours['label_tokens']} labels"
    return [ratio_row(preset.name, label, measure, {"ours": pick(ours[mode]), "reference": pick(full[mode])})
            for mode in ("forward", "forward+backward")
            for measure, pick in ((f"{mode} (ms), label-only vs full logits", lambda r: 1000 * r["median_s"]),
                                  (f"{mode}: memory above the model (MiB)", lambda r: r["extra_mib"]))]


def vision_rows(preset: Preset, runs: dict) -> list[dict]:
    """Two epochs with the feature cache (ours) vs re-encoding, and the frames each sends through the tower."""
    label = f"vision: {preset.videos} videos x {preset.frames} frames, 2 epochs"
    seconds = {"ours": sum(runs["cache"]["seconds"]), "reference": sum(runs["re-encode"]["seconds"])}
    frames = {"ours": runs["cache"]["tower_frames"], "reference": runs["re-encode"]["tower_frames"]}
    return [ratio_row(preset.name, label, "2 epochs (s), feature cache vs re-encoding", seconds, fmt="{:.2f}"),
            {"preset": preset.name, "shape": label, "measure": "frames through the tower, epoch 1 / epoch 2",
             **{k: " / ".join(map(str, v)) for k, v in frames.items()},
             "target": "epoch 2: 0", "verdict": verdict(frames["ours"][1] == 0)}]


def memory_rows(preset: Preset, shape: str, methods: dict, device) -> list[dict]:
    """Where one training step's memory goes (bench/memory.py), per method and stack: the peak (as train measures
    it, judged), what was resident before the step (tensors by kind; on the CPU, the process's memory by kind of
    mapping and glibc's free heap), the step's own tensors at their peak by what holds them, and what autograd
    saves in a forward without checkpointing, by module group."""
    first = next(iter(methods.values()))["ours"]
    label, rows = f"{shape}: B {first['batch']} x T {first['length']}", []
    row = partial(ratio_row, preset.name, label)
    cpu = device.type == "cpu"
    for method, runs in methods.items():
        name = METHOD_NAMES[method]
        base = {k: v["libraries_mib"] if cpu else 0.0 for k, v in runs.items()}
        rows.append(row(f"{name} peak memory{' above the libraries' if cpu else ''} (MiB)",
                        {k: v["peak_mib"] - base[k] for k, v in runs.items()}, MEMORY_TARGET))
        if cpu:  # library code and data paged in after the baseline are the libraries' too (not judged)
            rows.append(row(f"{name}   the same without library files paged in after the libraries were measured",
                            {k: v["peak_mib"] - base[k] - paged_in(v, "other files") for k, v in runs.items()}))
        rows.append(row(f"{name}   resident before the step", {k: v["resident_before_mib"] - base[k]
                                                               for k, v in runs.items()}))
        for kind in first["resident_tensors_mib"]:
            rows.append(row(f"{name}     tensors: {kind.strip()}", {k: v["resident_tensors_mib"][kind]
                                                                    for k, v in runs.items()}, fmt="{:.1f}"))
        if cpu:
            for kind in ("weights files", "other files", "anonymous"):
                rows.append(row(f"{name}     resident, {kind} (above the libraries)",
                                {k: paged_in(v, kind) for k, v in runs.items()}))
            rows.append(row(f"{name}       of it, glibc heap kept free", {k: v["heap_before"]["arena_free_mib"]
                                                                          for k, v in runs.items()}))
        rows.append(row(f"{name}   the step's tensors at their peak", {k: v["tensor_peak_mib"]
                                                                      for k, v in runs.items()}))
        for group in dict.fromkeys(group for v in runs.values() for group in v["at_peak_mib"]):
            values = {k: v["at_peak_mib"].get(group, 0.0) for k, v in runs.items()}
            if max(values.values()) >= 0.5:
                rows.append(row(f"{name}     {group}", values, fmt="{:.1f}"))
        if cpu:
            growth = {k: v["peak_mib"] - v["resident_before_mib"] - v["tensor_peak_mib"] for k, v in runs.items()}
            rows.append(row(f"{name}   the step's growth beyond its tensors", growth))
        rows.append(row(f"{name}   saved for backward in a forward without checkpointing",
                        {k: sum(v["saved_without_checkpointing_mib"].values()) for k, v in runs.items()},
                        fmt="{:.1f}"))
        for group in dict.fromkeys(group for v in runs.values() for group in v["saved_without_checkpointing_mib"]):
            values = {k: v["saved_without_checkpointing_mib"].get(group, 0.0) for k, v in runs.items()}
            if max(values.values()) >= 0.5:
                rows.append(row(f"{name}     {group}", values, fmt="{:.1f}"))
    return rows


def paged_in(run: dict, kind: str) -> float:
    """MiB of one kind of mapping (bench/memory.resident_by_mapping) resident before the step beyond the libraries'."""
    return run["mappings_before_mib"].get(kind, 0.0) - run["libraries_mappings_mib"].get(kind, 0.0)


def model_rows(preset: Preset, results: dict, device) -> list[dict]:
    """Every row of the measured tasks, in the order they ran."""
    rows = [row for shape, methods in results.get("train", {}).items()
            for row in train_rows(preset, shape, methods, device)]
    rows += [row for shape, methods in results.get("memory", {}).items()
             for row in memory_rows(preset, shape, methods, device)]
    rows += generate_rows(preset, results["generate"]) if "generate" in results else []
    rows += loss_rows(preset, results["loss"]) if "loss" in results else []
    return rows + (vision_rows(preset, results["vision"]) if "vision" in results else [])


def print_model_table(rows: list[dict], judged: bool) -> None:
    """The rows as a markdown table, each value in its row's format, ratios to two decimals."""
    columns = ["preset", "shape", "measure", "ours", "reference", "tuned", "ours/reference", "ours/tuned", "target"]
    print("\n| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|")
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            if value is None:
                cells.append("")
            elif column.startswith("ours/"):
                cells.append(f"{value:.2f}")
            elif column == "target":
                cells.append(f"{value}: {row['verdict'] if judged else '(toy sizes, not judged)'}")
            else:
                cells.append(row.get("format", "{}").format(value) if isinstance(value, float) else str(value))
        print("| " + " | ".join(cells) + " |")
