import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from conftest import REPO
from thinkdiff_core.generate import generate

ASSETS = REPO / "thinkdiff_core" / "assets"


def cli(*args, cwd=REPO):
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # the package, also when run from another folder
    return subprocess.run([sys.executable, "-m", "thinkdiff_core", "generate", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_lvlm_generation_with_several_seeds_is_reproducible_from_its_record(tmp_path, tiny_models):
    out = tmp_path / "run"
    result = cli("--vlm", tiny_models["vlm"], "--aligner", tiny_models["aligner"], "--flux", tiny_models["flux"],
                 "--items", "white", "thinkdiff_core/assets/white_car.png", "blue", "thinkdiff_core/assets/blue_car.png",
                 "red", "--seeds", 3, 4, "--steps", 2, "--size", 64, "--max-new-tokens", 8, "--out", out)
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "run.json").read_text())
    assert record["variant"] == "lvlm" and record["seeds"] == [3, 4] and record["size"] == 64
    assert record["items"][1] == str(ASSETS / "white_car.png")  # absolute, so reruns work from anywhere
    assert [o["image"] for o in record["outputs"]] == ["seed_3.png", "seed_4.png"]
    for output in record["outputs"]:
        assert Image.open(out / output["image"]).size == (64, 64)
        assert (out / output["answer_file"]).read_text().strip() == output["answer"].strip()
    assert record["versions"]["transformers"] and record["versions"]["torch"]

    again = tmp_path / "again"
    assert cli("--config", out / "run.json", "--out", again, cwd=tmp_path).returncode == 0
    for name in ("seed_3.png", "seed_4.png"):
        assert (again / name).read_bytes() == (out / name).read_bytes()
    assert (out / "seed_3.png").read_bytes() != (out / "seed_4.png").read_bytes()


def test_clip_generation_composes_images_and_prompt(tmp_path, tiny_models):
    record = generate({"variant": "clip", "vision": str(tiny_models["blip2"]), "aligner": str(tiny_models["aligner_clip"]),
                       "flux": str(tiny_models["flux"]), "images": [str(ASSETS / "cat.png"), str(ASSETS / "pink_sunglasses.png")],
                       "prompt": "on a beach", "seeds": [0], "steps": 1, "size": 64}, tmp_path, log=lambda _: None,
                      progress=False)
    assert record["outputs"] == [{"seed": 0, "image": "seed_0.png"}]
    assert Image.open(tmp_path / "seed_0.png").size == (64, 64)


@pytest.mark.parametrize("params, error, message", [
    ({"variant": "lvlm", "items": ["a"]}, ValueError, "the lvlm variant needs --vlm --aligner --flux"),
    ({"variant": "clip", "vision": "v", "aligner": "a", "flux": "f"}, ValueError, "the clip variant needs --images"),
    ({"variant": "sdxl"}, ValueError, "variant must be lvlm or clip"),
    ({"colour": 1}, ValueError, "unknown parameters: colour"),
    ({"vlm": "v", "aligner": "a", "flux": "f", "items": ["a"], "seeds": []}, ValueError, "give at least one seed"),
])
def test_bad_parameters_are_clear_errors(tmp_path, params, error, message):
    with pytest.raises(error, match=message):
        generate(params, tmp_path, log=lambda _: None, progress=False)


def test_a_missing_image_is_named(tmp_path, tiny_models):
    result = cli("--vlm", tiny_models["vlm"], "--aligner", tiny_models["aligner"], "--flux", tiny_models["flux"],
                 "--items", "white", tmp_path / "nope.jpg", "red", "--out", tmp_path / "out")
    assert result.returncode == 2 and result.stderr.startswith(f"error: image not found: {tmp_path / 'nope.jpg'}")


def test_lvlm_generation_with_a_4bit_vlm_is_recorded(tmp_path, tiny_models):
    pytest.importorskip("bitsandbytes")
    record = generate({"vlm": str(tiny_models["vlm"]), "aligner": str(tiny_models["aligner"]),
                       "flux": str(tiny_models["flux"]), "items": ["white", "blue"], "seeds": [0], "steps": 1,
                       "size": 64, "max_new_tokens": 4, "quantize": "4bit"}, tmp_path, log=lambda _: None,
                      progress=False)
    assert record["quantize"] == "4bit" and Image.open(tmp_path / "seed_0.png").size == (64, 64)
    with pytest.raises(ValueError, match="quantization must be one of 8bit, 4bit, got '2bit'"):
        generate({**record, "quantize": "2bit"}, tmp_path / "bad", log=lambda _: None, progress=False)
