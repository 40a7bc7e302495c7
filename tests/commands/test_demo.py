import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from conftest import REPO
from thinkdiff_core import load_aligner
from thinkdiff_core.condition import clip_pooled, flux_inputs
from thinkdiff_core.commands.demo import EXAMPLE_ITEMS, run_demo
from thinkdiff_core.render import load_flux


@pytest.mark.slow
def test_demo_command_runs_the_main_job_on_tiny_models(tmp_path):
    """The README's first command, as a new user runs it (tiny models built into an empty cache)."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "thinkdiff_core", "demo", "--out", str(out)], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "tiny random models" in result.stdout and "draw noise" in result.stdout
    image = Image.open(out / "image.png")
    assert image.size == (512, 512)
    low, high = image.convert("L").getextrema()
    assert low < high
    assert (out / "answer.txt").read_text().strip()
    report = json.loads((out / "timings.json").read_text())
    assert report["models"] == "tiny-random" and report["conditioning_tokens"] == 128
    assert report["steps"] == 28 and report["guidance"] == 3.5 and report["size"] == 512
    for key in ("load_vlm_s", "reason_s", "align_s", "load_flux_s", "render_s", "total_s"):
        assert report["timings"][key] >= 0
    assert list((tmp_path / "cache" / "thinkdiff").glob("tiny-models-*/complete"))


def test_demo_with_a_models_dir_uses_those_models(tmp_path, tiny_models):
    messages = []
    report = run_demo(tiny_models["vlm"].parent, tmp_path, steps=2, size=64, log=messages.append)
    assert report["vlm"] == str(tiny_models["vlm"]) and report["aligner"] == str(tiny_models["aligner"])
    assert Image.open(tmp_path / "image.png").size == (64, 64)
    # The last line: where the outputs are.
    assert messages[-1] == (f"image: {tmp_path / 'image.png'}; timings: {tmp_path / 'timings.json'}; "
                            f"answer: {tmp_path / 'answer.txt'}")


def test_demo_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no Qwen2-VL folder in {tmp_path}: looked for Qwen2-VL-7B-Instruct"):
        run_demo(tmp_path, tmp_path / "out", log=lambda _: None)
    result = subprocess.run([sys.executable, "-m", "thinkdiff_core", "demo", "--models-dir", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: no Qwen2-VL folder")
    with pytest.raises(FileNotFoundError, match=f"--models-dir {tmp_path / 'typo'}: no such folder"):
        run_demo(tmp_path / "typo", tmp_path / "out", log=lambda _: None)


def test_a_prompt_without_the_clip_variant_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"--prompt is the clip variant's text \(the lvlm example reasons over its "
                                         r"fixed words and pictures\); add --variant clip"):
        run_demo(None, tmp_path / "out", prompt="on a beach", log=lambda _: None)


def test_flux_inputs_are_the_aligned_tokens_and_pooled_clip_of_the_empty_string(tiny_models):
    pipe = load_flux(tiny_models["flux"], device="cpu")
    aligner = load_aligner(tiny_models["aligner"])
    aligned = aligner(torch.randn(128, aligner.in_features, generator=torch.Generator().manual_seed(0)))
    prompt_embeds, pooled = flux_inputs(pipe, aligned)
    assert prompt_embeds.shape == (1, 128, aligner.out_features)  # no padding to 256/512
    torch.testing.assert_close(prompt_embeds[0], aligned)
    ids = pipe.tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = pipe.text_encoder(ids).pooler_output
    torch.testing.assert_close(pooled, expected)
    torch.testing.assert_close(clip_pooled(pipe.tokenizer, pipe.text_encoder, "", "cpu"), expected)
    with pytest.raises(ValueError, match="aligned tokens are 7-d but this FLUX reads 32-d"):
        flux_inputs(pipe, torch.zeros(4, 7))


def test_example_is_the_two_shot_car_prompt():
    white, white_car, blue, blue_car, query = [Image.open(i) if i.endswith(".png") else i for i in EXAMPLE_ITEMS]
    assert (white, blue, query) == ("white", "blue", "red")
    assert white_car.convert("RGB").getpixel((128, 140)) == (245, 245, 245)  # the car body
    assert blue_car.convert("RGB").getpixel((128, 140)) == (40, 80, 200)


@pytest.mark.parametrize("options, message", [
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--size", "8"], "--size must be a positive multiple of 16 (FLUX: VAE factor 8 x patch 2), got 8"),
    (["--device", "cuda"], "--device cuda: no CUDA GPU is usable here"),
])
def test_bad_options_are_refused_before_the_tiny_models_are_built(monkeypatch, capsys, options, message):
    from thinkdiff_core.commands import demo
    from thinkdiff_core.__main__ import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(demo, "ensure_tiny_models", lambda: pytest.fail("tiny models built before the check"))
    assert main(["demo", *options]) == 2
    assert capsys.readouterr().err.startswith(f"error: {message}")


def test_the_clip_demo_removes_an_earlier_answer(tmp_path, tiny_models):
    (tmp_path / "answer.txt").write_text("an earlier lvlm run's answer\n")
    run_demo(tiny_models["vlm"].parent, tmp_path, variant="clip", steps=1, size=16, log=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.png", "timings.json"]
