"""The reasoning benchmark's CPU smoke run, quantised loading and the drift it measures."""

import importlib.util
import json
import re
import time

import pytest
import torch

from thinkdiff_core import Reasoner
from thinkdiff_core.__main__ import main
from thinkdiff_core.reason import quantized_size
from thinkdiff_core.commands.bench import (QWEN2_VL_7B, kernel_kind, language_model_bytes, random_qwen2_vl, shallow, summary,
                                  synthetic_inputs)

HOST_PEAK_RSS = "host peak RSS (resource.getrusage; pip install psutil for the current RSS)"


def test_bench_on_a_folder_compares_generate_and_the_fast_path(tiny_models, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--vlm", str(tiny_models["vlm"]), "--device", "cpu", "--tokens", "12", "--repeats", "1",
                 "--leak-runs", "2", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert json.loads(out.read_text()) == printed and captured.err.splitlines()[-1] == f"results: {out}"
    assert printed["device"] == "cpu" and printed["new_tokens"] == 12 and printed["prompt_tokens"] > 0
    for path in ("generate", "fast"):
        assert printed[path]["warm_s"] > 0 and printed[path]["prefill_s"] > 0
        assert 0 <= printed[path]["decode_ms_per_token"] <= 1000 * printed[path]["warm_s"] / 11
    fast = printed["fast"]
    assert fast["vs_generate"]["same_tokens"] and fast["vs_generate"]["matching_prefix_tokens"] == 12
    assert fast["vs_generate"]["prefix_max_abs_diff"] < 1e-4
    assert fast["vs_generate_same_tokens"]["min_cosine"] > 0.99999
    assert fast["cuda_graph"] is False
    # Off CUDA the leak check reads the process's host memory.
    assert fast["leak"]["runs"] == 2 and fast["leak"]["memory"] in ("host RSS (psutil)", HOST_PEAK_RSS)
    assert fast["goals"]["no_leak_over_10_runs"] == (abs(fast["leak"]["run10_minus_run1_mib"]) <= 100)
    assert printed["fast_compiled"] == {"skipped": "compilation is used with CUDA graphs only"}
    profile = fast["step_profile"]
    assert profile["what"] == "CPU ops, self time" and "graph_replay" not in profile
    step = profile["step"]
    assert step["ms_by_kind"]["matmul"] > 0 and step["launched_per_step"] > 0
    assert sum(step["ms_by_kind"].values()) == pytest.approx(step["ms_per_step"], abs=1e-3)
    assert step["top"][0]["ms_per_step"] >= step["top"][-1]["ms_per_step"]
    # float32, 4 layers of the same widths: the same seed gives the same tokens.
    assert printed["exactness"]["same_tokens"] and printed["exactness"]["layers"] == 4
    assert fast["goals"]["states_within_bf16_tolerance"] and fast["goals"]["same_draws_as_generate_float32"]
    assert fast["goals"]["4x_faster_than_generate"] == (fast["speedup_vs_generate"] >= 4)
    lines = summary(printed)
    assert lines[0].startswith("cpu: floor None s") and lines[1].startswith("  generate: first_call_s=")
    unmet = ", ".join(goal for goal, met in fast["goals"].items() if not met) or "none"
    assert lines[2].startswith("  fast: first_call_s=") and lines[2].endswith(f" | goals unmet: {unmet}")
    assert lines[3] == "  fast_compiled: skipped=compilation is used with CUDA graphs only"
    variations = printed["variations"]
    warm = ", ".join(f"{n}: {variations[n]['warm_s']} s" for n in ("1", "2", "4", "8"))
    unmet = "none" if variations["four_vs_one"] <= 1.3 else "four_variations_within_1.3x_one"
    assert lines[4] == f"  variations: warm {warm}; four_vs_one={variations['four_vs_one']} | goals unmet: {unmet}"
    assert lines[5].startswith("  exactness: {")
    # Variations: 1, 2, 4 and 8 sequences decoded together in this process, per step and per sequence.
    assert variations["path"] == "fast" and [key for key in variations if key.isdigit()] == ["1", "2", "4", "8"]
    for count in (1, 2, 4, 8):
        entry = variations[str(count)]
        assert entry["warm_s"] > 0 and entry["cuda_graph"] is False
        assert entry["decode_ms_per_token_per_sequence"] == pytest.approx(entry["decode_ms_per_step"] / count, abs=1e-3)
    assert variations["four_vs_one"] == round(variations["4"]["warm_s"] / variations["1"]["warm_s"], 3)


def test_bench_with_random_weights_saves_loads_and_measures_quantisation_drift(tiny_models, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    saved = tmp_path / "random"
    assert main(["bench", "--config", str(tiny_models["vlm"] / "config.json"), "--device", "cpu", "--tokens", "8",
                 "--repeats", "1", "--leak-runs", "0", "--image-size", "56", "--prompt-tokens", "40",
                 "--paths", "generate", "fast", "--save-random", str(saved), "--quantize", "8bit", "4bit",
                 "--variations"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert "variations" not in printed  # --variations without counts: left out
    assert printed["prompt_tokens"] == 40 and printed["model"].startswith("random weights")
    assert printed["fast"]["vs_generate"]["same_tokens"] and printed["exactness"]["same_tokens"]
    assert printed["load"]["on_device"] and printed["load"]["min_cosine_vs_before_saving"] > 0.99999
    assert any(saved.glob("*.safetensors"))
    for quantization in ("8bit", "4bit"):
        drift = printed[quantization]["drift_vs_unquantised_same_tokens"]
        assert 0.9 < drift["min_cosine"] < 1.0 and drift["min_cosine"] <= drift["mean_cosine"]


@pytest.mark.parametrize("arguments, message", [
    (["--device", "cpu"], "without a CUDA GPU, give --vlm FOLDER or --config config.json: the default builds "
                          "Qwen2-VL-7B (about 33 GB in float32), which is meant for a GPU"),
    (["--device", "cpu", "--config", "{vlm}/config.json", "--quantize", "4bit"],
     "--quantize loads from a folder: give --vlm, or --save-random DIR to save the random model"),
    (["--vlm", "{vlm}", "--device", "cpu", "--tokens", "0"], "--tokens and --repeats must be at least 1, got 0 and 3"),
    (["--vlm", "{vlm}", "--device", "cpu", "--quantize", "8bit"],
     "--quantize needs bitsandbytes, an optional dependency: pip install bitsandbytes"),
    (["--vlm", "{vlm}", "--device", "cpu", "--variations", "1", "0"],
     "--variations takes counts of at least 1, got 1 0"),
])
def test_bench_refuses_bad_arguments_before_building_anything(tiny_models, capsys, monkeypatch, arguments, message):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    monkeypatch.setattr(Reasoner, "from_pretrained", lambda *a, **k: pytest.fail("loaded a model"))
    arguments = [argument.format(vlm=tiny_models["vlm"]) for argument in arguments]
    assert main(["bench", *arguments]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_bench_on_cuda_without_a_gpu_says_so(capsys):
    assert main(["bench", "--device", "cuda"]) == 2
    assert capsys.readouterr().err == ("error: --device cuda: no CUDA GPU is usable here (torch.cuda.is_available() is "
                                       "False); leave --device out or use --device cpu\n")


def test_synthetic_inputs_have_the_issues_shape_for_qwen2_vl_7b():
    """Two 448x448 images are 256 tokens each; 612 tokens in all (checked on the meta device: no memory)."""
    model = random_qwen2_vl(QWEN2_VL_7B, torch.device("meta"), torch.bfloat16)
    inputs = synthetic_inputs(model, torch.device("cpu"))
    ids = inputs["input_ids"][0]
    assert ids.shape == (612,) and int((ids == QWEN2_VL_7B["image_token_id"]).sum()) == 512
    assert inputs["image_grid_thw"].tolist() == [[1, 32, 32], [1, 32, 32]]
    assert inputs["pixel_values"].shape == (2048, 1176)
    # Language-model weights: what the issue's floor divides by the bandwidth (15.2 GB).
    assert round(language_model_bytes(model) / 1e9, 1) == 15.2
    small = random_qwen2_vl(shallow(QWEN2_VL_7B, 4), torch.device("meta"), torch.float32)
    assert len(small.get_decoder().layers) == 4 and small.get_decoder().norm.weight.shape == (3584,)
    assert synthetic_inputs(small, torch.device("cpu"))["input_ids"].shape == (1, 612)


def test_quantised_loading_keeps_vision_and_head_and_matches_plain_sampling(tiny_models, car_images):
    pytest.importorskip("bitsandbytes")
    reference = Reasoner.from_pretrained(tiny_models["vlm"], device="cpu")
    white, blue = car_images
    inputs = reference.prepare_inputs(*reference.render_prompt(["white", white, "blue", blue, "red"]))
    tokens, states = reference.sample(inputs, seed=0, max_new_tokens=16, min_new_tokens=16)
    quantised = Reasoner.from_pretrained(tiny_models["vlm"], device="cpu", dtype="bfloat16", quantization="4bit")
    model = quantised.model
    assert type(model.get_decoder().layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert type(model.get_output_embeddings()) is torch.nn.Linear
    vision_linears = [m for name, m in model.named_modules() if "visual" in name and isinstance(m, torch.nn.Linear)]
    assert vision_linears and all(type(m) is torch.nn.Linear for m in vision_linears)
    fast = quantised.sample(inputs, seed=0, max_new_tokens=16, min_new_tokens=16)
    plain = quantised.sample(inputs, seed=0, max_new_tokens=16, min_new_tokens=16, fast=False)
    assert torch.equal(fast[0], plain[0])
    torch.testing.assert_close(fast[1], plain[1], atol=0.05, rtol=0.02)  # bf16 tolerance
    _, forced = quantised.sample(inputs, seed=0, max_new_tokens=16, min_new_tokens=16, forced_tokens=tokens)
    cosine = torch.nn.functional.cosine_similarity(forced, states, dim=-1)
    assert 0.9 < cosine.min() < 0.99999  # drifts, but stays close


def loaded_bytes(model):
    """A quantised model's weights as they lie in memory, the quantisation scales included."""
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    for parameter in model.parameters():
        for scale in (getattr(getattr(parameter, "quant_state", None), "absmax", None), getattr(parameter, "SCB", None)):
            if scale is not None:
                total += scale.numel() * scale.element_size()
    return total


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_the_quantised_size_is_known_before_loading(tiny_models, quantization):
    pytest.importorskip("bitsandbytes")
    estimate = quantized_size(tiny_models["vlm"], quantization)
    loaded = Reasoner.from_pretrained(tiny_models["vlm"], device="cpu", dtype="bfloat16", quantization=quantization)
    assert estimate == pytest.approx(loaded_bytes(loaded.model), rel=0.02)


def test_quantisation_errors_name_the_choice_and_the_package(tiny_models, monkeypatch):
    with pytest.raises(ValueError, match="quantization must be one of 8bit, 4bit, got '3bit'"):
        Reasoner.from_pretrained(tiny_models["vlm"], device="cpu", quantization="3bit")
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match="8bit loading needs bitsandbytes, an optional dependency"):
        Reasoner.from_pretrained(tiny_models["vlm"], device="cpu", quantization="8bit")


def test_bench_measures_the_compiled_path_first_eager_then_compiled(reasoner, car_images, emulated_graphs,
                                                                    monkeypatch):
    """The CUDA-only branch of the benchmark, run with emulated graphs: a GPU run must not fail in it."""
    from thinkdiff_core.commands import bench

    made = []

    class EmulatedDecoder(bench.FastDecoder):
        def __init__(self, *args, **options):
            super().__init__(*args, **options)
            emulated_graphs(self)
            made.append(self)

    monkeypatch.setattr(bench, "FastDecoder", EmulatedDecoder)
    white, blue = car_images
    inputs = reasoner.prepare_inputs(*reasoner.render_prompt(["white", white, "blue", blue, "red"]))
    measured = bench.Bench(reasoner, inputs, tokens=8, repeats=1, seed=0, log=lambda _: None).measure("fast_compiled")[0]
    assert [decoder.compile for decoder in made] == [True]
    assert measured["compiled_after_wait"] and measured["compiled"] and measured["cuda_graph"]
    assert measured["compile_s"] > 0 and measured["first_compiled_call_s"] > 0 and measured["warm_s"] > 0
    profile = bench.step_profile(made[0], inputs["input_ids"].shape[1])
    assert profile["graph_replay"]["ms_by_kind"]["matmul"] > 0 and profile["step"]["ms_by_kind"]["matmul"] > 0



def test_a_deadline_caps_the_compile_wait_to_leave_the_later_stages_their_time(reasoner):
    from thinkdiff_core.commands import bench

    inputs = synthetic_inputs(reasoner.model, reasoner.device, image_size=56, prompt_tokens=40)
    needs = {**dict.fromkeys(bench.GPU_STAGE_S, 0), "fast": 30, "step_profile": 10}
    deadline = bench.Deadline(time.time() + 100, needs)
    measured = bench.Bench(reasoner, inputs, tokens=4, repeats=1, seed=0, log=lambda _: None,
                           deadline=deadline).measure("fast_compiled", later=("step_profile",))[0]
    assert 55 <= measured["compile_wait_limit_s"] <= 60  # 100 s left less the warm runs' 30 s and the profile's 10 s
    assert bench.Deadline(time.time() + 1000, needs).cap(bench.COMPILE_TIMEOUT_S, "fast") == bench.COMPILE_TIMEOUT_S
    assert bench.Deadline(time.time() + 20, needs).cap(bench.COMPILE_TIMEOUT_S, "fast") == 0
    assert bench.Deadline().cap(bench.COMPILE_TIMEOUT_S, "fast") == bench.COMPILE_TIMEOUT_S  # none: no limit


def test_a_deadline_skips_the_stages_that_would_not_fit_with_a_note(tiny_models, tmp_path, monkeypatch):
    from thinkdiff_core.commands import bench

    needs = {**dict.fromkeys(bench.GPU_STAGE_S, 0), "step_profile": 1e4, "exactness": 1e4, "4bit": 1e4}
    monkeypatch.setattr(bench, "stage_needs", lambda device: needs)
    quantize = ["4bit"] if importlib.util.find_spec("bitsandbytes") else []
    results = bench.run_bench(config=str(tiny_models["vlm"] / "config.json"), device="cpu", tokens=4, repeats=1,
                              image_size=56, prompt_tokens=40, leak_runs=2, save_random=str(tmp_path / "random"),
                              quantize=quantize, out=str(tmp_path / "bench.json"), deadline=time.time() + 600,
                              log=lambda _: None)
    assert json.loads((tmp_path / "bench.json").read_text()) == json.loads(json.dumps(results))
    # Whatever the machine's speed: some of the 600 s are left, never the 10,000 s the stage needs.
    note = re.compile(r"deadline: ([1-5]?\d?\d|600) s left, 10000 s needed")
    fast = results["fast"]
    assert fast["warm_s"] > 0 and fast["vs_generate"]["same_tokens"] and fast["leak"]["runs"] == 2
    assert note.fullmatch(fast["step_profile"]["skipped"]) and note.fullmatch(results["exactness"]["skipped"])
    assert "same_draws_as_generate_float32" not in fast["goals"]  # not checked: no verdict
    assert results["load"]["min_cosine_vs_before_saving"] > 0.99999
    if quantize:
        assert note.fullmatch(results["4bit"]["skipped"])
    # Past the deadline (a CPU stage needs 1 s): every stage is skipped, loading too since nothing was saved.
    monkeypatch.undo()
    results = bench.run_bench(config=str(tiny_models["vlm"] / "config.json"), device="cpu", tokens=4,
                              image_size=56, prompt_tokens=40, save_random=str(tmp_path / "again"),
                              deadline=time.time() - 1, log=lambda _: None)
    assert results["generate"] == results["fast"] == results["exactness"] \
        == {"skipped": "deadline: 0 s left, 1 s needed"}
    assert results["save_random"] == results["load"] == {"skipped": "deadline: 0 s left, 2 s needed"}
    assert not (tmp_path / "again").exists()


def test_kernel_kinds():
    assert [kernel_kind(name) for name in ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80", "sm90_xmma_gemm_bf16bf16",
                                          "gemv2T_kernel_val<int, int, __nv_bfloat16>", "aten::addmm",
                                          "void cub::DeviceRadixSortOnesweepKernel", "triton_poi_fused_add_mul_0")] \
        == ["attention", "matmul", "matmul", "matmul", "sort", "other"]


def test_config_takes_the_model_folder_as_the_readme_says(tiny_models, tmp_path, capsys):
    folder = tiny_models["vlm"]
    assert main(["bench", "--config", str(folder), "--device", "cpu", "--tokens", "4", "--repeats", "1",
                 "--leak-runs", "2", "--image-size", "56", "--prompt-tokens", "40", "--paths", "generate", "fast",
                 "--no-exactness"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"] == f"random weights, config {folder / 'config.json'}" and printed["prompt_tokens"] == 40
    assert printed["fast"]["vs_generate"]["same_tokens"] and printed["fast"]["leak"]["runs"] == 2
    assert main(["bench", "--config", str(tmp_path), "--device", "cpu"]) == 2
    assert capsys.readouterr().err == (f"error: --config {tmp_path}: a folder without config.json (give a Qwen2-VL "
                                       f"config.json or the model folder holding it)\n")
    assert main(["bench", "--config", str(tmp_path / "nope.json"), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith(f"error: --config {tmp_path / 'nope.json'}: not found")


def test_decode_time_is_timed_inside_one_run_and_never_negative():
    """From the first token the run reports (the prefill's) to its last: a slow prefill cannot make it negative,
    as (full run - prefill-only run) did on a busy machine."""
    from thinkdiff_core.commands import bench

    def run(tokens, seed, on_token=None, prefill_s=0.0, step_s=0.0):
        time.sleep(prefill_s)
        on_token(1, tokens)
        for done in range(2, tokens + 1):
            time.sleep(step_s)
            on_token(done, tokens)
        return "result"

    seconds, result, decode = bench.timed_run(lambda n, s, on_token: run(n, s, on_token, prefill_s=0.05), 8, 0,
                                              torch.device("cpu"))
    assert result == "result" and 0 <= decode < 0.05 <= seconds
    seconds, _, decode = bench.timed_run(lambda n, s, on_token: run(n, s, on_token, step_s=0.01), 4, 0,
                                         torch.device("cpu"))
    assert 0.03 <= decode <= seconds
    assert bench.timed_run(lambda n, s, on_token: run(n, s, on_token), 1, 0, torch.device("cpu"))[2] == 0


def test_leak_check_off_cuda_reads_host_memory_with_psutil_or_resource(monkeypatch):
    import builtins

    from thinkdiff_core.commands import bench

    runs = []

    class Decoder:
        released = 0

        def release(self):
            self.released += 1

    decoder = Decoder()
    leak = bench.leak_over_runs(runs.append, decoder, 3, torch.device("cpu"))
    assert runs == [0, 1, 2] and decoder.released == 2  # before the runs (a fresh cache) and after them
    if importlib.util.find_spec("psutil"):
        assert leak["memory"] == "host RSS (psutil)"
    assert set(leak) == {"runs", "memory", "run1_minus_start_mib", "run10_minus_run1_mib", "released_minus_start_mib"}
    real_import = builtins.__import__

    def no_psutil(name, *args, **kwargs):
        if name == "psutil":
            raise ImportError("No module named 'psutil'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_psutil)
    leak = bench.leak_over_runs(lambda i: None, None, 2, torch.device("cpu"))
    assert leak["memory"] == HOST_PEAK_RSS and leak["runs"] == 2 and leak["run10_minus_run1_mib"] >= 0


def test_the_profilers_cuda_probe_error_is_dropped_without_cuda_and_nothing_else(capfd, monkeypatch):
    """kineto's "gpuGetDeviceCount failed with code 35" (a CUDA build of torch on a machine without a driver) is
    written to fd 2 by C++ code: the only line dropped; what else is written there comes through, in order."""
    import os

    from thinkdiff_core.commands import bench

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with bench.without_cuda_probe_error():
        os.write(2, b"USDT:2026-12-02 04:03:43 19436:19436 SyncActivityProfilerHandler.cpp:46] profiler_stop\n")
        os.write(2, b"ERROR:2026-12-02 04:03:43 19436:19436 DeviceProperties.cpp:56] gpuGetDeviceCount failed "
                    b"with code 35\n")
        os.write(2, b"ERROR: a real problem\n")
    assert capfd.readouterr().err == ("USDT:2026-12-02 04:03:43 19436:19436 SyncActivityProfilerHandler.cpp:46] "
                                      "profiler_stop\nERROR: a real problem\n")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # with CUDA the line would mean something
    with bench.without_cuda_probe_error():
        os.write(2, b"gpuGetDeviceCount failed with code 3\n")
    assert capfd.readouterr().err == "gpuGetDeviceCount failed with code 3\n"
