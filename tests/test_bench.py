"""The bench package keeps working: every measurement of the model benchmark once at toy sizes,
the adapters benchmark's quick path, and the pieces the figures rest on (the parity check, the snapshot both stacks
read, the label-only loss being vlm.py's)."""
import argparse
import json

import pytest
import torch
from tokenizers import Tokenizer

import bench
from bench.adapters import QUICK_SHAPES
from bench.stacks import GRADIENT_TOLERANCE, LABEL_LOSS_TOLERANCE, METHODS, SHAPES
from clip import load_clip_vision
from vlm import VLMConfig, build_vlm, caption_loss, splice_visual_tokens


@pytest.fixture(autouse=True)
def restore_threads():
    """The benchmarks run with --threads 1 here (tiny ops on a shared 2-core CPU stall waiting on a busy core);
    in-process runs set torch's thread count, so it is put back for the other test files."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def snapshot_dir(tmp_path_factory):
    """The quick preset's random Qwen3 + CLIP snapshot folders, written once for the module."""
    root = tmp_path_factory.mktemp("bench")
    bench.write_snapshots(bench.preset_for("cpu-small", quick=True), root, torch.device("cpu"))
    return root


def rows_by_measure(result: dict) -> dict:
    return {(row["shape"].split(":")[0], row["measure"]): row for row in result["rows"]}


def test_model_benchmark_runs_every_measurement_at_toy_sizes(snapshot_dir, tmp_path, capsys):
    out = tmp_path / "results.json"
    result = bench.main(["model", "--quick", "--inline", "--threads", "1", "--snapshot-dir", str(snapshot_dir),
                         "--json", str(out)])
    assert json.loads(out.read_text())["rows"] == result["rows"]
    assert {"torch", "transformers", "peft", "bitsandbytes"} <= set(result["versions"])
    rows = rows_by_measure(result)
    for shape in SHAPES:
        for method in ("LoRA", "DoRA"):
            measure = f"{method} per-label loss, mean abs. difference from ours (ours: adapters on vs off)"
            parity = rows[(shape, measure)]
            for stack in ("reference", "tuned"):  # the workers refuse to time otherwise; the table shows it
                assert parity[stack] <= LABEL_LOSS_TOLERANCE
            # the adapters move the losses far more than the stacks differ: the check tells their presence
            assert parity["ours"] > 10 * max(parity["reference"], parity["tuned"])
            step = rows[(shape, f"{method} step (ms)")]
            assert all(step[stack] > 0 for stack in ("ours", "reference", "tuned"))
            gradients = rows[(shape, f"{method} adapter gradients, relative L2 difference from ours")]
            assert max(gradients["reference"], gradients["tuned"]) <= GRADIENT_TOLERANCE  # checked before timing
    for method in METHODS:  # transformers' generate is checked to emit exactly new_tokens in the worker
        runs = result["results"]["generate"][method]
        assert runs["reference"]["captions_per_s"] > 0
        assert runs["ours-eager"]["greedy_equal"] == 1  # the worker refuses otherwise: eager = the static step
        assert "merged" in runs["ours-merged"]["merge"]
    for mode in ("forward", "forward+backward"):  # the worker checked that both variants give the same loss
        assert rows[("caption loss", f"{mode} (ms), label-only vs full logits")]["reference"] > 0
    vision = rows[("vision", "frames through the tower, epoch 1 / epoch 2")]
    assert vision["ours"].endswith("/ 0") and vision["verdict"] == "met"  # the cache: no tower in epoch 2
    assert vision["reference"].split(" / ")[0] == vision["reference"].split(" / ")[1] != "0"  # re-encoding
    assert "| preset | shape | measure | ours | reference | tuned |" in capsys.readouterr().out


def test_default_command_runs_a_measurement_in_its_own_process(snapshot_dir, tmp_path):
    out = tmp_path / "results.json"
    result = bench.main(["--quick", "--threads", "1", "--tasks", "vision", "--snapshot-dir", str(snapshot_dir),
                         "--json", str(out)])
    assert result["isolation"] == "one process per measurement"
    assert result["command"].startswith("python -m bench model")  # the default command
    assert result["results"]["vision"]["cache"]["tower_frames"][1] == 0


@pytest.mark.parametrize("preset, quant", [("cpu-small", "int8"), ("cpu-small-moe", "nf4")])
def test_int8_and_moe_training_rows_are_checked_against_the_reference(preset, quant, tmp_path):
    """The int8 and Qwen3-MoE rows: both stacks train on the same quantized numbers (a MoE reference's bf16 experts
    hold ours' dequantized values), the parity checks pass before any timing, and the table names the quantization.
    A MoE adapts its attention projections only, in both stacks."""
    from safetensors.torch import load_file
    result = bench.main(["model", "--quick", "--inline", "--threads", "1", "--preset", preset, "--quant", quant,
                         "--tasks", "train", "--methods", "lora,dora", "--snapshot-dir", str(tmp_path),
                         "--json", str(tmp_path / "results.json")])
    assert result["quant"] == quant
    rows = rows_by_measure(result)
    for shape in SHAPES:
        for method in ("LoRA", "DoRA"):
            measure = f"{method} per-label loss, mean abs. difference from ours (ours: adapters on vs off)"
            parity = rows[(shape, measure)]
            assert max(parity["reference"], parity["tuned"]) <= LABEL_LOSS_TOLERANCE
            assert parity["ours"] > 10 * max(parity["reference"], parity["tuned"])
            gradients = rows[(shape, f"{method} adapter gradients, relative L2 difference from ours")]
            assert max(gradients["reference"], gradients["tuned"]) <= GRADIENT_TOLERANCE
            assert all(rows[(shape, f"{method} step (ms)")][stack] > 0 for stack in ("ours", "reference", "tuned"))
    assert all(quant in row["preset"] for row in result["rows"]) == (quant != "nf4")
    adapted = {name.rsplit(".", 1)[0] for name in load_file(tmp_path / "gradients-train-resampler-lora.safetensors")}
    config = json.loads((tmp_path / "llm" / "config.json").read_text())
    if preset == "cpu-small-moe":
        assert config["model_type"] == "qwen3_moe" and 4 in (config.get("num_experts"), config.get("num_local_experts"))
        assert all(".self_attn." in name for name in adapted) and len(adapted) == 4 * config["num_hidden_layers"]
        index = json.loads((tmp_path / "llm" / "model.safetensors.index.json").read_text())["weight_map"]
        assert "model.layers.0.mlp.experts.3.down_proj.weight" in index  # the hub's per-expert layout
    else:
        assert len(adapted) == 7 * config["num_hidden_layers"]


def test_a_reference_that_disagrees_is_not_timed(snapshot_dir, tmp_path):
    worker = ["_one", "--task", "train", "--preset", "cpu-small", "--quick", "--threads", "1", "--root",
              str(snapshot_dir), "--stack", "tuned", "--method", "dora", "--shape", "resampler"]
    losses = bench.main(worker)["label_losses"]
    expect = tmp_path / "expect.json"
    expect.write_text(json.dumps(losses))
    assert bench.main(worker + ["--expect", str(expect)])["max_difference"] == 0  # deterministic on the CPU
    losses = [loss + 2 * LABEL_LOSS_TOLERANCE for loss in losses]
    expect.write_text(json.dumps(losses))
    with pytest.raises(SystemExit, match="differ from ours"):
        bench.main(worker + ["--expect", str(expect)])


def test_label_only_loss_is_vlm_forward_and_equals_full_logits(tiny_bases):
    clip, llm = tiny_bases
    model = build_vlm(VLMConfig(clip_path=str(clip), llm_path=str(llm), projector={"name": "linear"}),
                      dtype=torch.float32)
    features = torch.randn(2, 8, 16, 32, generator=torch.Generator().manual_seed(0))  # (B, F, P, Dv)
    captions = ["빨간 원이 움직인다.", "파란 배경에서 노란 삼각형이 위로 올라간다."]
    input_ids, labels = model.tokenize_batch(captions, 8 * 16)
    embeds = splice_visual_tokens(model.llm.model.embed_tokens, input_ids, model.project(features),
                                  model.template.video_pad_id)
    hidden = model.llm.hidden_states(inputs_embeds=embeds)
    ours = caption_loss(model.llm, hidden, labels)
    torch.testing.assert_close(ours, model(features, captions), rtol=0, atol=0)
    torch.testing.assert_close(ours, bench.full_logits_loss(model.llm, hidden, labels), rtol=1e-5, atol=1e-5)


def test_both_stacks_load_the_written_snapshot_alike(tmp_path):
    """Sharded random weights + index + tokenizer.json: kovlm's loader and transformers' read the same model."""
    from transformers import Qwen3ForCausalLM

    from qwen3 import load_qwen3
    preset = bench.preset_for("cpu-small", quick=True)
    folders = bench.write_snapshots(preset, tmp_path, torch.device("cpu"), shard_bytes=1 << 16)
    assert sorted(p.name for p in folders["llm"].glob("model-*.safetensors")) == \
        [f"model-{i:05d}.safetensors" for i in (1, 2, 3)]  # 64 KiB shards
    ids = torch.randint(0, preset.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = load_qwen3(folders["llm"], dtype=torch.float32)(ids)
        reference = Qwen3ForCausalLM.from_pretrained(folders["llm"], dtype=torch.float32).eval()(ids).logits
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    assert Tokenizer.from_file(str(folders["llm"] / "tokenizer.json")).get_vocab_size() == preset.vocab_size
    assert load_clip_vision(folders["clip"]).config.num_patches == preset.patches


def test_layers_keeps_the_widths_and_says_so():
    preset = bench.preset_for("qwen3-8b", quick=False, layers=8)
    assert (preset.layers, preset.hidden_size, preset.intermediate_size) == (8, 4096, 12288)
    assert preset.name == "qwen3-8b, 8 of 36 layers"
    assert bench.preset_for("qwen3-8b", quick=False, layers=36) == bench.PRESETS["qwen3-8b"]


def test_adapters_benchmark_quick(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = bench.main(["adapters", "--quick", "--threads", "1"])
    assert not (tmp_path / "bench_results.json").exists()  # only `model` writes it by default
    assert [row["shape"] for row in result["rows"]] == [f"{i}x{o}" for i, o in QUICK_SHAPES]
    for row in result["rows"]:
        assert all(ms > 0 for ms in row["ms"].values())
        assert max(row["max_relative_difference"].values()) < 2e-2  # bf16 compute, same NF4 weights
    assert "(toy sizes, not judged)" in capsys.readouterr().out


def test_fp32_greedy_captions_equal_the_reference(snapshot_dir, tmp_path):
    """In fp32 (weights and compute) the reference's greedy captions must equal ours (the worker refuses to go on
    otherwise), and so must ours eager and ours merged."""
    result = bench.main(["model", "--quick", "--inline", "--threads", "1", "--dtype", "fp32", "--tasks", "generate",
                         "--methods", "lora", "--snapshot-dir", str(snapshot_dir), "--json", str(tmp_path / "r.json")])
    runs = result["results"]["generate"]["lora"]
    assert [runs[k]["greedy_equal"] for k in ("ours-eager", "ours-merged", "reference")] == [1, 1, 1]


def test_profile_reports_ops_and_where_each_synchronising_call_comes_from(snapshot_dir, tmp_path):
    result = bench.main(["profile", "--quick", "--threads", "1", "--snapshot-dir", str(snapshot_dir),
                         "--json", str(tmp_path / "p.json")])
    train = result["train_step"]
    assert train["top_host"] and train["host_ms"] > 0
    # the only data-dependent op on ours' step path is the label positions, found on the host-side labels
    nonzero = [call for call in train["sync_calls"] if call.startswith("aten::nonzero")]
    assert nonzero and all(" on cpu from vlm.py:" in call for call in nonzero)
    assert "decode_step" not in result and result["decode_step_eager"]["top_host"]  # no CUDA graph on the CPU
    assert not result["decode_step_eager"]["sync_calls"]  # the static decode step never reads back


def test_memory_task_breaks_one_step_down_alike_for_each_stack(snapshot_dir, tmp_path):
    """--tasks memory: each stack's step profiled the same way (the reference's parity checks run first); what is
    live at the tensor peak adds up to it, and ours' written-out adapter backward keeps less than PEFT's."""
    result = bench.main(["model", "--quick", "--inline", "--threads", "1", "--tasks", "memory", "--methods", "lora",
                         "--shapes", "per-patch", "--snapshot-dir", str(snapshot_dir), "--json",
                         str(tmp_path / "m.json")])
    runs = result["results"]["memory"]["per-patch"]["lora"]
    assert set(runs) == {"ours", "reference", "tuned"} and "mean_difference" in runs["tuned"]
    for run in runs.values():
        assert run["tensor_peak_mib"] > 0
        assert sum(run["at_peak_mib"].values()) == pytest.approx(run["tensor_peak_mib"])
        assert run["resident_tensors_mib"]["trainable parameters (adapters, projector)"] > 0
    adapters = {k: v["saved_without_checkpointing_mib"]["decoder: adapters (LoRA / DoRA)"] for k, v in runs.items()}
    assert 0 < adapters["ours"] < adapters["tuned"]
    measures = {row["measure"] for row in result["rows"]}
    assert "LoRA peak memory above the libraries (MiB)" in measures


def grid_results(layers: int, step_s: dict, captions_per_s: float) -> dict:
    train = {shape: {method: {"ours": {"median_s": step_s[shape], "batch": batch}} for method in ("lora", "dora")}
             for shape, batch in (("resampler", 4), ("per-patch", 1))}
    generate = {method: {"ours": {"captions_per_s": captions_per_s}} for method in ("lora", "dora")}
    return {"preset": {"name": "qwen3-8b", "layers": layers}, "results": {"train": train, "generate": generate}}


def test_reduction_bench_measures_all_tokens_against_the_kept_ones(snapshot_dir, capsys):
    """bench/reduction.py at toy sizes: each setting's LM sees its K visual tokens; the table and ratios come out."""
    from bench.reduction import add_arguments, bench_reduction
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    result = bench_reduction(parser.parse_args(["--preset", "cpu-small", "--quick", "--threads", "1", "--keep", "8",
                                                "--snapshot-dir", str(snapshot_dir)]))
    preset = bench.preset_for("cpu-small", quick=True)
    tokens = {name: s["visual_tokens"] for name, s in result["settings"].items()}
    assert tokens == {"merge+divprune 8": 8, "none": preset.frames * preset.patches}
    for s in result["settings"].values():
        assert s["prefill_length"] > s["visual_tokens"] and s["train_length"] > s["prefill_length"]
        assert all(s[part]["median_s"] > 0 and s[part]["peak_mib"] > 0 for part in ("train_step", "prefill"))
    assert set(result["all_over_reduced"]) == {"train_step", "prefill"}
    assert "all tokens / reduced" in capsys.readouterr().out


def test_grid_estimate_projects_the_plan_from_measured_times(tmp_path):
    train_file, generate_file = tmp_path / "train.json", tmp_path / "generate.json"
    results = grid_results(36, {"resampler": 0.2, "per-patch": 0.5}, captions_per_s=10.0)
    train_file.write_text(json.dumps(results | {"results": {"train": results["results"]["train"]}}))
    generate_file.write_text(json.dumps(results | {"results": {"generate": results["results"]["generate"]}}))
    estimate = bench.main(["grid-estimate", str(train_file), str(generate_file), "--json", str(tmp_path / "g.json")])
    # per-patch: 500 steps of 0.5 s per epoch, 7 epochs; validation: 50 / 10 s + 50 steps x 0.5 s / 3 per epoch
    per_patch = (7 * 500 * 0.5 + 7 * (50 / 10.0 + 50 * 0.5 / 3)) / 3600
    resampler = (7 * 125 * 0.2 + 7 * (50 / 10.0 + 13 * 0.2 / 3)) / 3600
    assert estimate["total_h"] == pytest.approx(4 * per_patch + 4 * resampler)
    assert estimate["verdict"] == "met"
    train_file.write_text(json.dumps(grid_results(8, {"resampler": 0.2, "per-patch": 0.5}, 10.0)))
    assert bench.main(["grid-estimate", str(train_file)])["verdict"].startswith("not judged")
    del results["results"]["train"]["per-patch"]
    train_file.write_text(json.dumps(results))
    with pytest.raises(ValueError, match="train/per-patch/lora/ours"):
        bench.main(["grid-estimate", str(train_file)])


def probe_splits(num_train: int = 96, num_test: int = 48, frames: int = 4, patches: int = 16, width: int = 16):
    """Features where each video's colour is one fixed direction added to the object's patches (a quarter of the
    grid) over noise: a linear readout of the right tensor recovers it, a random projector mostly hides it."""
    from demo.synth import ATTRIBUTES
    from formats.manifests import Sample
    colours = list(ATTRIBUTES["colour"])
    directions = torch.randn(len(colours), width, generator=torch.Generator().manual_seed(1)) * 2
    splits, generator = {}, torch.Generator().manual_seed(0)
    for split, count in (("train", num_train), ("test", num_test)):
        labels = torch.arange(count) % len(colours)
        x = torch.randn(count, frames, patches, width, generator=generator)
        x[:, :, :patches // 4] += directions[labels][:, None, None, :]
        samples = [Sample(f"{split}{i}", None, [], split, {"colour": colours[c]})
                   for i, c in enumerate(labels.tolist())]
        splits[split] = (x, samples)
    return splits


def test_probe_reads_the_cut_it_names_and_learns_a_clear_attribute():
    """bench probe: `stage2:in` is the C-Abstractor's pooled map (B·F', Dm, s, s), `readout` its tokens; a trained
    projector + head classifies an attribute that the features hold linearly, on the held-out videos."""
    from bench.probe import capture, demo_projector_config, probe
    from projectors import projector_from_config
    config = demo_projector_config("cabstractor", 16, 32, num_frames=4, depth=1)
    projector = projector_from_config(config)
    pooled, tokens = capture(projector, "stage2:in"), capture(projector, "readout")
    projector(torch.randn(3, 4, 16, 16))
    s = projector.pooled_side
    assert pooled["x"].shape == (3 * config.pooled_frames, config.width, s, s)
    assert tokens["x"].shape == (3, config.num_queries, 32)
    result = probe(probe_splits(), config, "colour", "readout", steps=[60], frozen=False)
    assert result["width"] == config.num_queries * 32
    assert result["accuracy"][60] >= 0.9, result


def test_pruning_and_rehearse_are_subcommands():
    """bench/cli.py builds `pruning` and `rehearse` from their modules' add_parser, like its other parts."""
    from bench.cli import build_parser
    from bench.pruning import bench_pruning
    from bench.rehearse import COMMAND_NAMES, bench_rehearse
    parser = build_parser()
    rehearse = parser.parse_args(["rehearse", "--layers", "2", "--device", "cpu", "--commands", "train,export"])
    assert (rehearse.run, rehearse.layers, rehearse.clip_layers, rehearse.commands) == \
        (bench_rehearse, 2, 24, ["train", "export"])
    assert parser.parse_args(["rehearse"]).commands == list(COMMAND_NAMES)
    assert parser.parse_args(["rehearse"]).layers == 36
    assert parser.parse_args(["pruning", "--tokens", "64"]).run == bench_pruning
    with pytest.raises(SystemExit):
        parser.parse_args(["rehearse", "--commands", "train,fly"])


def test_memory_table_is_computed_from_the_published_configs_and_the_stored_formats(capsys):
    """`python -m bench memory`: bf16 weights of Qwen3-8B are its published size; the nf4 and int8 bits per weight
    are what bitsandbytes stores for a layer quantized as qwen3.py does; every size x quantization has a row."""
    from bench.memory import NF4_BITS, linear_rows, published_config, weight_bytes
    from moe import parameter_counts
    from nf4 import bnb, empty_nf4_linear, quantize_int8
    d = published_config("Qwen3-8B")
    assert weight_bytes(d, "bf16") == 16_381_470_720  # the bf16 total_size in Qwen3-8B's safetensors index
    counts = parameter_counts(d)
    rest = counts["embeddings"] + counts["norms_and_biases"]
    assert linear_rows(d) == 36 * (4096 + 2 * 1024 + 4096 + 2 * 12288 + 4096)
    assert weight_bytes(d, "int8") == counts["linear_weights"] + 4 * linear_rows(d) + 2 * rest
    weight = torch.randn(64, 4096)
    layer = empty_nf4_linear(4096, 64, bias=False, compute_dtype=torch.float32)
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                     module=layer).to("cpu")
    state = layer.weight.quant_state
    stored = [layer.weight.data, state.absmax, state.state2.absmax]
    assert sum(t.numel() * t.element_size() for t in stored) * 8 / weight.numel() == NF4_BITS
    int8 = quantize_int8(weight, "cpu")
    assert int8.numel() * 1 + int8.SCB.numel() * 4 == 64 * 4096 + 4 * 64  # 8 bits + an fp32 scale per row
    result = bench.main(["memory"])
    printed = capsys.readouterr().out
    assert result["computed"] and "COMPUTED" in printed and len(result["rows"]) == 7 * 3
    moe = {row["quant"]: row for row in result["rows"] if row["model"] == "Qwen3-30B-A3B"}
    assert moe["nf4"]["weights_gib"] < moe["int8"]["weights_gib"] < moe["bf16"]["weights_gib"]
    assert all(row["per_patch"]["total"] > row["perceiver"]["total"] for row in result["rows"])


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_memory_of_a_loaded_snapshot_is_measured_beside_the_computed_bytes(quant, tmp_path):
    """`python -m bench memory SNAPSHOT --quant Q`: the bytes the loaded weights take, scales included, agree with
    weight_bytes' formula for the same config (block and group remainders of a tiny model aside), and the JSON
    names its command and CPU."""
    from conftest import save_tiny_qwen3
    folder = save_tiny_qwen3(tmp_path / "qwen3", hidden_size=256, intermediate_size=512, head_dim=64)
    out = tmp_path / "memory.json"
    result = bench.main(["memory", str(folder), "--quant", quant, "--json", str(out)])
    assert json.loads(out.read_text())["weights_mib"] == result["weights_mib"]
    assert result["weights_mib"] == pytest.approx(result["computed_weights_mib"], rel=0.02)
    assert result["command"] == f"python -m bench memory {folder} --quant {quant} --json {out}"
    assert result["device"]["cores"] >= 1 and result["peak_rss_mib"] >= result["rss_before_mib"]


def test_loading_breakdown_measures_each_step_of_the_first_layers(tmp_path):
    """`python -m bench loading SNAPSHOT`: every quantized linear of the first layer is read, quantized and placed,
    each step timed, and the rates are extrapolated to the model's linear weights."""
    from conftest import save_tiny_qwen3
    folder = save_tiny_qwen3(tmp_path / "qwen3", hidden_size=128, intermediate_size=256, head_dim=32, layers=3,
                             max_shard_size="200KB")
    result = bench.main(["loading", str(folder), "--quant", "int8", "--layers", "1", "--threads", "1", "--full"])
    d = json.loads((folder / "config.json").read_text())
    layer = 128 * 32 * (d["num_attention_heads"] + 2 * d["num_key_value_heads"]) + 32 * d["num_attention_heads"] * 128
    layer += 3 * 128 * 256
    assert result["weights_measured"] == layer and result["linear_weights"] == 3 * layer
    assert all(seconds > 0 for seconds in result["seconds"].values()) and result["full_load_s"] > 0
    assert result["extrapolated_s"]["loader"] == pytest.approx(3 * result["seconds"]["loader"])
    assert result["command"].startswith("python -m bench loading")
