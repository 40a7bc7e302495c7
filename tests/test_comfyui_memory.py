"""benchmarks/comfyui_memory.py: the queued-runs memory check, dry-run on the CPU with the stand-in host.

On the CPU ComfyUI keeps every model where it is, so eviction itself is measured only on a GPU
(stage comfyui_memory of benchmarks/gpu.sh); here the plumbing runs for real: the pack imported as ComfyUI imports it,
its loader nodes reading the written models, queued Reason runs and the FLUX-sized stand-in.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import comfyui_memory  # noqa: E402


@pytest.mark.slow
def test_dry_run_queues_reason_runs_and_the_flux_stand_in(tmp_path):
    out = tmp_path / "memory.json"
    completed = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "comfyui_memory.py"), "--cpu", "--runs", "2", "--tokens", "4",
         "--flux-gib", "0.001", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["vlm"] == "Qwen2-VL-tiny" and results["tokens"] == 4 and list(results["passes"]) == ["fp32"]
    result = results["passes"]["fp32"]
    assert [r["run"] for r in result["runs"]] == [0, 1, 2]
    assert all(r["reason_s"] > 0 and r["vlm_gpu_gib_after_reason"] == 0 for r in result["runs"])
    assert result["runs"][0]["compiled_after_wait"] is False  # no compilation without CUDA graphs
    assert result["same_conditioning_after_reload"] is True and result["reload_max_abs_diff"] == 0.0
    assert result["summary"] == {"queued_runs": 2, "median_reason_s": result["summary"]["median_reason_s"],
                                 "median_flux_load_s": result["summary"]["median_flux_load_s"],
                                 "eviction": "not measured: ComfyUI keeps every model on the CPU",
                                 "same_conditioning_after_reload": True}
    assert completed.stdout.strip().splitlines()[-1] == f"fp32: {json.dumps(result['summary'])}"


@pytest.mark.slow
def test_each_precision_is_a_pass_and_a_failing_pass_keeps_the_others(tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "memory.json"
    completed = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "comfyui_memory.py"), "--cpu", "--runs", "1", "--tokens", "2",
         "--flux-gib", "0.001", "--precisions", "fp16", "4-bit (bitsandbytes)", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    passes = json.loads(out.read_text())["passes"]
    assert list(passes) == ["fp16", "4-bit (bitsandbytes)"]
    assert passes["fp16"]["error"].startswith("ValueError: float16 is refused for Qwen2-VL")
    quantised = passes["4-bit (bitsandbytes)"]
    assert quantised["precision"] == "4-bit (bitsandbytes)" and len(quantised["runs"]) == 2
    assert quantised["same_conditioning_after_reload"] is True


@pytest.mark.slow
def test_past_its_deadline_the_check_skips_what_would_not_fit_with_a_note(tmp_path):
    out = tmp_path / "memory.json"
    completed = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "comfyui_memory.py"), "--cpu", "--deadline", str(time.time() - 1),
         "--out", str(out)], capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert completed.returncode == 1, completed.stderr[-3000:]  # no pass ran
    results = json.loads(out.read_text())
    # Writing the models and a pass need 1 s each on the CPU.
    assert results["skipped"] == "deadline: 0 s left, 2 s needed" and results["passes"] == {}
    assert completed.stdout.strip() == results["skipped"]


def test_random_weights_of_another_size_keep_the_tiny_processors_token_ids(tmp_path):
    from thinkdiff_core import Reasoner
    from thinkdiff_core.commands.bench import QWEN2_VL_7B

    small = {**QWEN2_VL_7B, "hidden_size": 96, "intermediate_size": 160, "num_attention_heads": 4,
             "num_key_value_heads": 2, "num_hidden_layers": 1, "max_window_layers": 1,
             "rope_scaling": {"type": "mrope", "mrope_section": [4, 4, 4]},
             "vision_config": {**QWEN2_VL_7B["vision_config"], "depth": 1, "embed_dim": 32, "num_heads": 2,
                               "hidden_size": 96}}
    name = comfyui_memory.write_models(tmp_path, small, device="cpu")
    folder = tmp_path / "LLM" / name
    config = json.loads((folder / "config.json").read_text())
    assert config.get("text_config", config)["hidden_size"] == 96
    assert not (tmp_path / "LLM" / "Qwen2-VL-tiny").exists()
    aligner = torch.load(tmp_path / "thinkdiff" / "thinkdiff_lvlm.pth", weights_only=True)["model"]
    assert aligner["mm_projector.0.weight"].shape == (4096, 96)

    from PIL import Image
    reasoner = Reasoner.from_pretrained(folder, device="cpu", dtype=torch.float32)
    cars = [Image.open(REPO / "workflows" / name).convert("RGB") for name in ("white_car.png", "blue_car.png")]
    result = reasoner.reason(["white", cars[0], "blue", cars[1], "red"], seed=0, max_new_tokens=3)
    assert result.hidden_states.shape == (3, 96)  # the processor's image tokens are the model's


def test_summary_of_a_gpu_queue():
    def record(run, vlm_reason=15.5, flux_reason=0.0, vlm_flux=0.0, flux_flux=11.1, freed=True, compiled=True,
               other_mib=700.0, flux_resident_mib=5120.0):
        # Weights on the GPU move with ComfyUI's partial offloading; only memory that is not weights counts.
        after_reason = {"allocated_mib": 15872 + flux_resident_mib + other_mib, "not_weights_mib": other_mib,
                        "reserved_mib": 24000.0, "host_rss_mib": 30000.0}
        after_flux = {"allocated_mib": 11366 + other_mib, "not_weights_mib": other_mib, "reserved_mib": 24000.0,
                      "host_rss_mib": 30000.0}
        return {"run": run, "reason_s": 1.0 + run / 10, "flux_load_s": 2.0, "vlm_gpu_gib_after_reason": vlm_reason,
                "flux_gpu_gib_after_reason": flux_reason, "vlm_gpu_gib_after_flux": vlm_flux,
                "flux_gpu_gib_after_flux": flux_flux, "decoder_cache_freed": freed, "compiled": compiled,
                "after_reason": after_reason, "after_flux": after_flux}

    cuda = torch.device("cuda", 0)
    runs = [record(0, compiled=False)] + [record(i, flux_reason=5.0) for i in range(1, 11)]
    runs[10] = record(10, flux_reason=4.875, flux_resident_mib=4992.0)  # one more FLUX module offloaded
    assert comfyui_memory.summarize(runs, cuda, (15.5, 11.1)) == {
        "queued_runs": 10, "median_reason_s": 1.6, "median_flux_load_s": 2.0, "vlm_on_gpu_while_reasoning": True,
        "vlm_evicted_when_flux_loaded": True, "flux_on_gpu_when_loaded": True, "flux_offloaded_when_vlm_loaded": True,
        "leak_runs": [1, 10], "after_reason_not_weights_last_minus_first_mib": 0.0,
        "after_reason_allocated_last_minus_first_mib": -128.0, "after_reason_reserved_last_minus_first_mib": 0.0,
        "after_flux_not_weights_last_minus_first_mib": 0.0, "after_flux_allocated_last_minus_first_mib": 0.0,
        "after_flux_reserved_last_minus_first_mib": 0.0, "host_rss_last_minus_first_mib": 0.0, "no_leak": True}

    # The VLM left on the GPU once, FLUX never making room, 150 MiB more held after the last run: each is reported.
    runs[5] = record(5, vlm_flux=15.5, freed=False)
    runs[6] = record(6, flux_reason=11.1)
    runs[10] = record(10, flux_reason=5.0, other_mib=850.0)
    summary = comfyui_memory.summarize(runs, cuda, (15.5, 11.1))
    assert not summary["vlm_evicted_when_flux_loaded"] and not summary["flux_offloaded_when_vlm_loaded"]
    assert summary["after_reason_not_weights_last_minus_first_mib"] == 150.0 and summary["no_leak"] is False

    # Compilation still running through run 1 (its layer copy held): the baseline is the first compiled run.
    runs = [record(0, compiled=False), record(1, compiled=False, other_mib=1140.0)] + [record(i) for i in range(2, 11)]
    summary = comfyui_memory.summarize(runs, cuda, (15.5, 11.1))
    assert summary["leak_runs"] == [2, 10] and summary["no_leak"] is True

    # A quantised VLM stays on the GPU (ComfyUI cannot move it) and FLUX fits beside it: nothing moves.
    runs = [record(i, vlm_reason=6.4, vlm_flux=6.4, flux_reason=11.1, freed=False) for i in range(11)]
    summary = comfyui_memory.summarize(runs, cuda, (6.4, 11.1), movable=False)
    assert summary["vlm_stays_on_gpu"] and summary["flux_stays_on_gpu"] and summary["vlm_on_gpu_while_reasoning"]
    assert "vlm_evicted_when_flux_loaded" not in summary and summary["no_leak"] is True
    runs[4] = record(4, vlm_reason=6.4, vlm_flux=6.4, flux_reason=6.0)
    assert not comfyui_memory.summarize(runs, cuda, (6.4, 11.1), movable=False)["flux_stays_on_gpu"]



def test_default_passes(monkeypatch):
    from types import SimpleNamespace

    loaders = SimpleNamespace(QUANTIZED={"8-bit (bitsandbytes)": "8bit", "4-bit (bitsandbytes)": "4bit"})
    cuda, cpu = (SimpleNamespace(device=torch.device(kind), loaders=loaders) for kind in ("cuda", "cpu"))
    assert comfyui_memory.default_precisions(cpu) == ["fp32"]
    found = {"bitsandbytes": object()}
    monkeypatch.setattr(comfyui_memory.importlib.util, "find_spec", lambda name: found.get(name))
    assert comfyui_memory.default_precisions(cuda) == ["bf16", "4-bit (bitsandbytes)"]
    found.clear()
    assert comfyui_memory.default_precisions(cuda) == ["bf16"]
