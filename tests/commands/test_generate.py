import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from conftest import REPO, make_aligner
from thinkdiff_core.commands.generate import generate

ASSETS = REPO / "thinkdiff_core" / "assets"


def cli(*args, cwd=REPO):
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # the package, also when run from another folder
    return subprocess.run([sys.executable, "-m", "thinkdiff_core", "generate", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
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
                       "flux": str(tiny_models["flux"]), "items": ["white", str(ASSETS / "white_car.png"), "blue"],
                       "seeds": [0], "steps": 1,
                       "size": 64, "max_new_tokens": 4, "quantize": "4bit"}, tmp_path, log=lambda _: None,
                      progress=False)
    assert record["quantize"] == "4bit" and Image.open(tmp_path / "seed_0.png").size == (64, 64)
    with pytest.raises(ValueError, match="quantization must be one of 8bit, 4bit, got '2bit'"):
        generate({**record, "quantize": "2bit"}, tmp_path / "bad", log=lambda _: None, progress=False)


def run_main(argv, capsys):
    from thinkdiff_core.__main__ import main

    code = main([str(arg) for arg in argv])
    return code, capsys.readouterr().err


@pytest.fixture
def no_model_loads(monkeypatch):
    """Mistakes that can be seen in the arguments and files must be refused before any model loads."""
    from thinkdiff_core.commands import generate as module

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the mistake was reported")

    monkeypatch.setattr(module.Reasoner, "from_pretrained", refuse)
    monkeypatch.setattr(module.VisionEncoder, "from_pretrained", refuse)
    monkeypatch.setattr(module, "load_flux", refuse)
    return monkeypatch


WHITE, BLUE = ASSETS / "white_car.png", ASSETS / "blue_car.png"


@pytest.mark.parametrize("options, message", [
    (["--steps", 0], "--steps must be at least 1, got 0"),
    (["--steps", -1], "--steps must be at least 1, got -1"),
    (["--size", 8], "--size must be a positive multiple of 16 (FLUX: VAE factor 8 x patch 2), got 8; e.g. 16 or 32"),
    (["--size", 0], "--size must be a positive multiple of 16 (FLUX: VAE factor 8 x patch 2), got 0; e.g. 16 or 32"),
    (["--size", 100], "--size must be a positive multiple of 16 (FLUX: VAE factor 8 x patch 2), got 100; e.g. 96 "
                      "or 112"),
    (["--device", "cuda"], "--device cuda: no CUDA GPU is usable here (torch.cuda.is_available() is False); leave "
                           "--device out or use --device cpu"),
    (["--device", "gpu"], "--device 'gpu' is not a torch device, e.g. cuda, cuda:1 or cpu (Expected one of cpu"),
    (["--quantize", "4bit"], "4bit loading needs bitsandbytes, an optional dependency: pip install bitsandbytes"),
    (["--variations", 0], "variations must be an integer >= 1 (1 = a single sampling), got 0"),
    (["--seeds", -2], "seed must be an integer from 0 to 2**64 - 1, got -2"),
    (["--seeds", 2**64 - 1, "--variations", 2], "variation i samples with seed + i, so seed + variations - 1 must be "
                                                "at most 2**64 - 1; got seed 18446744073709551615 and 2 variations"),
])
def test_bad_options_are_refused_before_any_model_loads(tiny_models, no_model_loads, capsys, options, message):
    import importlib.util

    import torch

    no_model_loads.setattr(torch.cuda, "is_available", lambda: False)
    real_find_spec = importlib.util.find_spec
    no_model_loads.setattr(importlib.util, "find_spec",
                           lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    code, err = run_main(["generate", "--vlm", tiny_models["vlm"], "--aligner", tiny_models["aligner"], "--flux",
                          tiny_models["flux"], "--items", "white", WHITE, "red", *options], capsys)
    assert code == 2 and err.startswith(f"error: {message}"), err


def test_a_missing_gpu_number_is_named(monkeypatch):
    import torch

    from thinkdiff_core.render import check_options

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="--device cuda:3: this machine has 1 CUDA GPU"):
        check_options(1, None, "cuda:3")
    check_options(1, 16, "cuda:0")


RULE = "--items go word, image, word, image, ..., then the query word: "


@pytest.mark.parametrize("items, message", [
    (["white", WHITE, "blue", BLUE], RULE + "the last item is an image; add the query word after it"),
    (["white", WHITE, BLUE, "red"], RULE + f"item 3 ({str(BLUE)!r}) should be a word"),
    (["white", "red"], RULE + "item 2 ('red') should be an image (a path ending in .png, .jpg, .jpeg, .webp, .bmp)"),
    (["white", "car.pgn", "red"], RULE + "item 2 ('car.pgn') should be an image"),
    (["white", "{notes}", "red"], "item 2 ('{notes}') is a file but not an image ending in .png, .jpg"),
    (["{notes}", WHITE, "red"], "item 1 ('{notes}') is a file but not an image ending in .png, .jpg"),
    (["white", "{missing}", "red"], "image not found: {missing}"),
])
def test_items_follow_the_nodes_word_image_rule(tmp_path, tiny_models, no_model_loads, capsys, items, message):
    paths = {"notes": tmp_path / "notes.txt", "missing": tmp_path / "car.png"}
    paths["notes"].write_text("not an image\n")
    code, err = run_main(["generate", "--vlm", tiny_models["vlm"], "--aligner", tiny_models["aligner"], "--flux",
                          tiny_models["flux"], "--items", *[str(i).format(**paths) for i in items]], capsys)
    assert code == 2 and err.startswith(f"error: {message.format(**paths)}"), err


def test_bad_model_files_are_refused_before_the_vlm_loads(tmp_path, tiny_models, no_model_loads, capsys,
                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the default output folder would be made
    notes = tmp_path / "notes.txt"
    notes.write_text("not a checkpoint\n")
    common = ["generate", "--items", "white", WHITE, "red"]
    for models, message in [
        ({"--aligner": notes}, f"{notes}: not a PyTorch checkpoint or safetensors file"),
        ({"--aligner": tmp_path}, f"{tmp_path} is a folder; expected an aligner file (.safetensors or .pth)"),
        ({"--aligner": tiny_models["aligner_clip"]}, f"aligner {tiny_models['aligner_clip']} takes 48-d states but "
                                                     f"the VLM {tiny_models['vlm']} has hidden size 64"),
        ({"--flux": tmp_path}, f"{tmp_path} is not a diffusers FLUX folder (model_index.json missing)"),
        ({"--vlm": tmp_path}, f"{tmp_path} is not a Hugging Face model folder: config.json is missing"),
    ]:
        models = {"--vlm": tiny_models["vlm"], "--aligner": tiny_models["aligner"], "--flux": tiny_models["flux"],
                  **models}
        code, err = run_main(common + [x for pair in models.items() for x in pair], capsys)
        assert code == 2 and err.startswith(f"error: {message}"), err
        assert not (tmp_path / "generate_output").exists()  # the failed run left no empty folder


def test_aligner_widths_are_matched_with_the_vision_tower_and_flux_before_any_model_loads(tmp_path, tiny_models,
                                                                                          no_model_loads, capsys):
    narrow = tmp_path / "narrow.safetensors"
    make_aligner(narrow, 64, 16)  # reads the tiny VLM's states, writes 16-d where the tiny FLUX reads 32-d
    lvlm = ["--vlm", tiny_models["vlm"], "--flux", tiny_models["flux"], "--items", "white", WHITE, "red"]
    code, err = run_main(["generate", "--aligner", narrow, *lvlm], capsys)
    assert code == 2 and err == (f"error: aligner {narrow} writes 16-d features but the FLUX in {tiny_models['flux']} "
                                 f"reads 32-d T5 features\n")
    code, err = run_main(["generate", "--variant", "clip", "--vision", tiny_models["blip2"], "--aligner",
                          tiny_models["aligner"], "--flux", tiny_models["flux"], "--images", WHITE], capsys)
    assert code == 2 and err == (f"error: aligner {tiny_models['aligner']} takes 64-d features but the vision encoder "
                                 f"{tiny_models['blip2']} gives 48-d; use the aligner trained for it: ThinkDiff-LVLM's "
                                 f"takes Qwen2-VL-7B's 3584-d states, ThinkDiff-CLIP's BLIP-2's 1408-d features\n")


def test_options_of_the_other_variant_are_refused(tmp_path, tiny_models, no_model_loads, capsys):
    models = ["--flux", tiny_models["flux"]]
    code, err = run_main(["generate", "--vlm", tiny_models["vlm"], "--aligner", tiny_models["aligner"], *models,
                          "--items", "white", WHITE, "red", "--prompt", "on a beach", "--images", WHITE], capsys)
    assert code == 2 and err == ("error: the lvlm variant does not use --images, --prompt (given); leave them out or "
                                 "choose the other --variant\n")
    code, err = run_main(["generate", "--variant", "clip", "--vision", tiny_models["blip2"], "--aligner",
                          tiny_models["aligner_clip"], *models, "--images", WHITE, "--max-new-tokens", "8",
                          "--variations", "2"], capsys)
    assert code == 2 and err == ("error: the clip variant does not use --max-new-tokens, --variations (given); leave "
                                 "them out or choose the other --variant\n")


def test_a_run_record_with_the_other_variants_options_still_runs(tmp_path, tiny_models, no_model_loads):
    """Older versions recorded options the variant ignored; rerunning such a run.json must not be refused."""
    from thinkdiff_core.__main__ import main

    record = tmp_path / "run.json"
    record.write_text(json.dumps({"variant": "clip", "vision": str(tiny_models["blip2"]), "flux": str(tiny_models["flux"]),
                                  "aligner": str(tiny_models["aligner_clip"]), "images": [str(WHITE)],
                                  "items": ["white"], "max_new_tokens": 64, "vlm": str(tiny_models["vlm"])}))
    with pytest.raises(AssertionError, match="a model was loaded"):  # every check passed: loading began
        main(["generate", "--config", str(record), "--out", str(tmp_path / "out")])


def test_clip_images_must_be_readable_images(tmp_path, tiny_models, no_model_loads):
    fake = tmp_path / "cat.png"
    fake.write_text("not an image\n")
    with pytest.raises(ValueError, match=f"{fake}: not an image file PIL can read"):
        generate({"variant": "clip", "vision": str(tiny_models["blip2"]), "aligner": str(tiny_models["aligner_clip"]),
                  "flux": str(tiny_models["flux"]), "images": [str(fake)]}, tmp_path, log=lambda _: None)


def test_a_config_that_is_not_a_run_record_is_named(tmp_path, capsys):
    notes = tmp_path / "notes.md"
    notes.write_text("# notes\n")
    code, err = run_main(["generate", "--config", notes], capsys)
    assert code == 2 and err == f"error: --config {notes} is not a run.json (a JSON object of parameters): it is " \
                                "not readable JSON (Expecting value: line 1 column 1 (char 0))\n"
    notes.write_text("[1, 2]\n")
    code, err = run_main(["generate", "--config", notes], capsys)
    assert code == 2 and err == f"error: --config {notes} is not a run.json (a JSON object of parameters): it " \
                                "holds an array where a JSON object is expected\n"
    notes.write_text("[" * 100_000 + "]" * 100_000)  # nests past json's recursion: still one error line
    code, err = run_main(["generate", "--config", notes], capsys)
    assert code == 2 and err == f"error: --config {notes} is not a run.json (a JSON object of parameters): it " \
                                "nests deeper than 64 levels\n"
    code, err = run_main(["generate", "--config", tmp_path / "nope.json"], capsys)
    assert code == 2 and err.startswith(f"error: --config {tmp_path / 'nope.json'}: file not found")


def test_top_level_help_is_plain_text(capsys):
    from thinkdiff_core.__main__ import main

    with pytest.raises(SystemExit):
        main(["--help"])
    description = capsys.readouterr().out.split("\n\n")[1]
    assert description.startswith("ThinkDiff without ComfyUI: run the example (demo)")
    assert "`" not in description and "  " not in description


@pytest.mark.parametrize("argv0, usage", [("/venv/bin/thinkdiff", "usage: thinkdiff "),
                                          ("/repo/thinkdiff_core/__main__.py", "usage: python -m thinkdiff_core ")])
def test_usage_names_the_command_as_it_was_typed(capsys, monkeypatch, argv0, usage):
    from thinkdiff_core.__main__ import main

    monkeypatch.setattr(sys, "argv", [argv0, "--help"])
    with pytest.raises(SystemExit):
        main(["--help"])
    assert capsys.readouterr().out.startswith(usage)


def test_flux_gets_the_aligned_reasoning_the_guidance_and_the_steps(tmp_path, tiny_models, reasoner, monkeypatch):
    """What reaches FLUX: the aligner applied to the reasoning states of that seed, the paper's guidance 3.5 (or
    the one given) and the steps given."""
    import torch
    from diffusers import FluxPipeline

    from thinkdiff_core import load_aligner

    calls, real_call = [], FluxPipeline.__call__

    def spy(pipe, *args, **kwargs):
        calls.append(kwargs)
        return real_call(pipe, *args, **kwargs)

    monkeypatch.setattr(FluxPipeline, "__call__", spy)
    items = ["white", str(ASSETS / "white_car.png"), "blue"]
    params = {"vlm": str(tiny_models["vlm"]), "aligner": str(tiny_models["aligner"]), "flux": str(tiny_models["flux"]),
              "items": items, "seeds": [5], "steps": 2, "size": 32, "max_new_tokens": 4}
    generate(params, tmp_path / "default", log=lambda _: None, progress=False)
    generate({**params, "guidance": 7.0, "steps": 3}, tmp_path / "given", log=lambda _: None, progress=False)
    assert [(c["guidance_scale"], c["num_inference_steps"]) for c in calls] == [(3.5, 2), (7.0, 3)]

    states = reasoner.reason([Image.open(i) if i.endswith(".png") else i for i in items], seed=5, temperature=0.6,
                             top_p=0.9, max_new_tokens=4).hidden_states
    with torch.inference_mode():
        expected = load_aligner(tiny_models["aligner"])(states).float()
    for call in calls:
        assert call["prompt_embeds"].shape == (1, 4, expected.shape[-1])
        torch.testing.assert_close(call["prompt_embeds"][0].float().cpu(), expected, rtol=1e-4, atol=1e-5)


def test_a_run_names_its_seeds_bars_prints_answers_safely_and_ends_with_its_outputs(tmp_path, tiny_models, reasoner,
                                                                                   capsys, monkeypatch):
    """FLUX's progress bar says which seed it draws; an answer's control characters are printed escaped (the
    answer file keeps them); the last line names the images and the record."""
    import dataclasses

    from thinkdiff_core.commands import generate as module

    class Raw:  # the session's tiny reasoner, answering with a terminal escape, a carriage return and a bell
        def __getattr__(self, name):
            return getattr(reasoner, name)

        def reason_variations(self, *args, **kwargs):
            return [dataclasses.replace(result, text="a red car\x1b[2J\rgone\x07\n")
                    for result in reasoner.reason_variations(*args, **kwargs)]

    monkeypatch.setattr(module.Reasoner, "from_pretrained", lambda *args, **kwargs: Raw())
    out = tmp_path / "out"
    generate({"vlm": str(tiny_models["vlm"]), "aligner": str(tiny_models["aligner"]), "flux": str(tiny_models["flux"]),
              "items": ["white", str(ASSETS / "white_car.png"), "red"], "seeds": [3, 4], "steps": 1, "size": 16,
              "max_new_tokens": 2}, out)
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert "seed 3: a red car\\x1b[2J\\x0dgone\\x07" in lines and "\x1b" not in captured.out
    assert (out / "seed_3.txt").read_bytes() == b"a red car\x1b[2J\rgone\x07\n\n"  # as the model gave it
    assert "FLUX seed 3" in captured.err and "FLUX seed 4" in captured.err  # diffusers' tqdm bars
    assert lines[-1] == f"images: {out / 'seed_3.png'}, {out / 'seed_4.png'}; record: {out / 'run.json'}"
    assert all((out / name).is_file() for name in ("seed_3.png", "seed_4.png", "run.json"))
    generate(json.loads((out / "run.json").read_text()), out)  # nothing left to draw: the same last line
    assert capsys.readouterr().out.splitlines()[-1] == lines[-1]


def test_variations_draw_an_image_per_seed_from_reasonings_decoded_together(tmp_path, tiny_models, reasoner,
                                                                            monkeypatch):
    import torch
    from diffusers import FluxPipeline

    from thinkdiff_core import Reasoner, load_aligner

    calls, real_call = [], FluxPipeline.__call__
    monkeypatch.setattr(FluxPipeline, "__call__", lambda pipe, *a, **k: calls.append(k) or real_call(pipe, *a, **k))
    batches, real_variations = [], Reasoner.reason_variations
    monkeypatch.setattr(Reasoner, "reason_variations",  # generate passes its seeds by name
                        lambda self, *a, **k: batches.append(list(k["seeds"])) or real_variations(self, *a, **k))
    items = ["white", str(ASSETS / "white_car.png"), "blue"]
    out = tmp_path / "out"
    record = generate({"vlm": str(tiny_models["vlm"]), "aligner": str(tiny_models["aligner"]),
                       "flux": str(tiny_models["flux"]), "items": items, "seeds": [5, 6], "variations": 2, "steps": 1,
                       "size": 16, "max_new_tokens": 4}, out, log=lambda _: None, progress=False)
    # Seeds 5, 6 with two variations each: 5, 6, 7 once each, reasoned in one pass, an image each.
    assert batches == [[5, 6, 7]]
    monkeypatch.setattr(Reasoner, "reason_variations", real_variations)
    assert [o["seed"] for o in record["outputs"]] == [5, 6, 7] and record["variations"] == 2
    assert all((out / f"seed_{seed}.png").is_file() for seed in (5, 6, 7))
    aligner = load_aligner(tiny_models["aligner"])
    pictures = [Image.open(i) if i.endswith(".png") else i for i in items]
    for call, seed, output in zip(calls, (5, 6, 7), record["outputs"]):
        alone = reasoner.reason(pictures, seed=seed, max_new_tokens=4)
        with torch.inference_mode():
            expected = aligner(alone.hidden_states).float()
        torch.testing.assert_close(call["prompt_embeds"][0].float().cpu(), expected, rtol=1e-4, atol=1e-5)
        assert output["answer"] == alone.text
    # The record runs again to the same images: nothing left to draw.
    again = generate(json.loads((out / "run.json").read_text()), out, log=lambda _: None, progress=False)
    assert again["outputs"] == record["outputs"] and len(calls) == 3
