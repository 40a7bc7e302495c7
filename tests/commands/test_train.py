import json
import math
import random
import re
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from conftest import REPO
from thinkdiff_core import load_aligner
from thinkdiff_core.testing.readable_t5 import readable_copy
from thinkdiff_core.commands.prepare_lvlm import BRIEF_INSTRUCTIONS, prepare_lvlm
from thinkdiff_core.commands.train import (CLIPData, LVLMData, batch_keys, blip_caption, is_validation, learning_rate,
                                           split_caption, train)

READABLE_T5 = sorted((REPO / "tests" / "assets").glob("readable_flan_t5*.safetensors"))
QUIET_STEP = dict(steps=1, batch_size=2, lr=0.0, min_lr=0.0, warmup_lr=0.0, warmup_steps=0, save_every=1,
                  log=lambda _: None)  # one step that leaves the aligner as it started


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Eight captioned images: a folder of .png + same-stem .txt."""
    folder = tmp_path_factory.mktemp("images")
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 30),
               "white": (250, 250, 250), "black": (10, 10, 10), "purple": (150, 40, 160), "orange": (250, 140, 20)}
    for n, (name, rgb) in enumerate(colours.items()):
        Image.new("RGB", (40, 30), rgb).save(folder / f"img{n}.png")
        (folder / f"img{n}.txt").write_text(f"a plain {name} square on nothing at all")
    return folder


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, images, tiny_models):
    out = tmp_path_factory.mktemp("prepared")
    assert prepare_lvlm(tiny_models["vlm"], images, out, max_new_tokens=3, shard_size=5, log=lambda _: None) == 8
    return out


@pytest.fixture(scope="module")
def readable_t5(tmp_path_factory, tiny_models):
    """The tiny Flan-T5 whose decoder reads encoder states, as the real one does (see thinkdiff_core.testing.
    readable_t5; its weights are a committed asset, trained once)."""
    return readable_copy(tiny_models["flan_t5"], READABLE_T5, tmp_path_factory.mktemp("flan-t5-readable"))


def test_the_readable_t5_asset_fits_the_tiny_flan_t5_and_reads_its_encoders_states(readable_t5, tiny_models,
                                                                                   tmp_path):
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(readable_t5)
    batch = tokenizer(["a red car", "the moon", "blue", "a white car"], padding=True, return_tensors="pt")
    labels = batch.input_ids.masked_fill(batch.input_ids == tokenizer.pad_token_id, -100)

    def reconstruction_loss(folder):
        with torch.no_grad():
            return float(T5ForConditionalGeneration.from_pretrained(folder).eval()(**batch, labels=labels).loss)

    # Its decoder reproduces texts from the encoder's states; the random one it was trained from cannot.
    assert reconstruction_loss(readable_t5) < 0.2 * reconstruction_loss(tiny_models["flan_t5"])
    # An asset made for another tiny Flan-T5 (here: another vocabulary) is refused by name.
    other = tmp_path / "other"
    shutil.copytree(tiny_models["flan_t5"], other)
    tokenizer_json = json.loads((other / "tokenizer.json").read_text())
    tokenizer_json["model"]["vocab"][5][1] -= 1.0
    (other / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    with pytest.raises(ValueError, match="were made for another tiny Flan-T5 .* make the one for this "
                                         "transformers again with python -m thinkdiff_core.testing.readable_t5"):
        readable_copy(other, READABLE_T5, tmp_path / "copy")


def test_the_schedule_warms_up_linearly_then_follows_a_cosine():
    assert learning_rate(0, 200_000) == pytest.approx(1e-6)
    assert learning_rate(1000, 200_000) == pytest.approx(1e-6 + (1e-4 - 1e-6) / 2)
    assert learning_rate(2000, 200_000) == pytest.approx(8e-5 + 2e-5 * 0.5 * (1 + math.cos(math.pi * 0.01)))
    assert learning_rate(100_000, 200_000) == pytest.approx(9e-5)
    assert learning_rate(200_000, 200_000) == pytest.approx(8e-5)


def test_prepare_stores_states_ids_and_text_and_resumes(prepared, images, tiny_models, reasoner):
    shards = sorted(prepared.glob("shard-*.safetensors"))
    assert len(shards) == 2  # shard_size 5: 5 + 3
    with safe_open(str(shards[0]), framework="pt") as f:
        texts = json.loads(f.metadata()["texts"])
        states, ids = f.get_tensor("img0.states"), f.get_tensor("img0.ids")
    assert states.dtype == torch.bfloat16 and states.shape == (len(ids), reasoner.hidden_size) and 1 <= len(ids) <= 3
    assert texts["img0"]["instruction"] in BRIEF_INSTRUCTIONS
    assert texts["img0"]["text"] == reasoner.processor.tokenizer.decode(ids, skip_special_tokens=True)
    assert (prepared / "tokenizer" / "tokenizer.json").is_file()
    assert prepare_lvlm(tiny_models["vlm"], images, prepared, max_new_tokens=3, log=lambda _: None) == 0


def test_labels_are_the_t5_tokens_of_the_text_after_the_split(prepared, tiny_models):
    from transformers import AutoTokenizer

    t5_tokenizer = AutoTokenizer.from_pretrained(tiny_models["flan_t5"])
    data = LVLMData(prepared, t5_tokenizer)
    keys = data.keys[:4]
    batch = data.batch(keys, random.Random(7), "cpu")
    rng = random.Random(7)
    for row, key in enumerate(keys):
        states, ids = data.sample(key)
        split = rng.randint(1, max(1, min(len(ids) - 1, 128)))
        assert batch["mask"][row].sum() == split
        torch.testing.assert_close(batch["states"][row, :split], states[:split].float())
        expected = t5_tokenizer(data.vlm_tokenizer.decode(ids[split:], skip_special_tokens=True)).input_ids
        labels = batch["labels"][row]
        assert labels[labels != -100].tolist() == expected


def test_overfitting_eight_samples_trains_only_the_aligner(prepared, readable_t5, tmp_path):
    logs = []
    result = train("lvlm", readable_t5, prepared, tmp_path, steps=600, batch_size=8, lr=3e-2, min_lr=1e-3,
                   warmup_steps=0, val_fraction=0, log_every=1, save_every=600, log=logs.append)
    losses = [float(line.split(" loss ")[1].split()[0]) for line in logs if line.startswith("step ")]
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])

    from transformers import T5ForConditionalGeneration

    fresh = T5ForConditionalGeneration.from_pretrained(readable_t5).state_dict()
    assert result["t5"].encoder is None  # LVLM: the decoder alone reads the aligner, so the encoder is not held
    for name, value in result["t5"].state_dict().items():
        assert torch.equal(value.cpu(), fresh[name]), name
    checkpoint = load_aligner(tmp_path / "aligner.safetensors")
    x = torch.randn(5, checkpoint.in_features)
    torch.testing.assert_close(checkpoint(x), result["aligner"].float()(x))
    with safe_open(str(tmp_path / "aligner.safetensors"), framework="pt") as f:
        assert f.metadata()["variant"] == "lvlm" and f.metadata()["step"] == "600"
    assert (tmp_path / "aligner-0000600.safetensors").is_file()
    header = (tmp_path / "log.csv").read_text().splitlines()[0]
    assert header == "step,loss,lr,samples_per_s,val_loss"


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one mixed precision per process: start and leave it unset, as its own test cases do."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_t5_is_held_in_the_precision_and_the_norm_starts_from_its_stored_encoder_norm(
        prepared, tiny_models, tmp_path, fresh_accelerate_state, precision):
    from transformers import T5ForConditionalGeneration

    shutil.copytree(tiny_models["flan_t5"], tmp_path / "t5")
    t5 = T5ForConditionalGeneration.from_pretrained(tiny_models["flan_t5"])
    with torch.no_grad():  # a norm that bf16 cannot hold exactly (the tiny one is all ones)
        t5.encoder.final_layer_norm.weight.add_(torch.linspace(0.001, 0.1, t5.config.d_model))
    t5.save_pretrained(tmp_path / "t5")
    result = train("lvlm", tmp_path / "t5", prepared, tmp_path / "run", precision=precision, cpu=True, **QUIET_STEP)
    expected = torch.bfloat16 if precision == "bf16" else torch.float32
    assert {p.dtype for p in result["t5"].parameters()} == {expected}  # `wo` too, which from_pretrained keeps fp32
    assert math.isfinite(result["last"]["loss"])
    torch.testing.assert_close(result["aligner"][3].weight, t5.encoder.final_layer_norm.weight, rtol=0, atol=0)


def test_the_clip_aligner_starts_as_blip2_inits_it_and_the_lvlm_one_as_pytorch(images, prepared, tiny_models,
                                                                               tmp_path):
    clip = train("clip", tiny_models["flan_t5"], images, tmp_path / "clip", vision=tiny_models["blip2"],
                 **QUIET_STEP)["aligner"]
    for linear in (clip[0], clip[2]):  # Blip2PreTrainedModel._init_weights: N(0, 0.02), zero bias
        assert torch.count_nonzero(linear.bias) == 0
        assert abs(linear.weight.mean().item()) < 0.003 and 0.018 < linear.weight.std().item() < 0.022
    lvlm = train("lvlm", tiny_models["flan_t5"], prepared, tmp_path / "lvlm", **QUIET_STEP)["aligner"]
    for linear in (lvlm[0], lvlm[2]):  # nn.Linear's own: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), bias too
        bound = linear.in_features ** -0.5
        assert torch.count_nonzero(linear.bias) == linear.out_features and linear.bias.abs().max() <= bound
        assert linear.weight.abs().max() <= bound and linear.weight.std() > 0.9 * bound / math.sqrt(3)


def test_train_warns_of_a_run_shorter_than_its_warm_up_and_ends_with_the_aligner(prepared, tiny_models, tmp_path,
                                                                                capsys):
    from thinkdiff_core.__main__ import main

    out = tmp_path / "run"
    assert main(["train", "--variant", "lvlm", "--t5", str(tiny_models["flan_t5"]), "--data", str(prepared), "--out",
                 str(out), "--steps", "2", "--batch-size", "2", "--lr", "0.01", "--warmup-lr", "0",
                 "--warmup-steps", "4", "--save-every", "2", "--log-every", "1", "--cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # The last step (index 1) trains at 0 + 0.01 x 1/4 of the way up.
    assert lines[0] == ("warning: --steps 2 is shorter than the warm-up (--warmup-steps 4): the learning rate never "
                        "reaches its peak --lr 0.01 (it ends at 0.0025)")
    assert lines[-1] == f"aligner: {out / 'aligner.safetensors'}" and (out / "aligner.safetensors").is_file()
    assert sum(line.startswith("warning") for line in lines) == 1
    messages = []  # as long as the warm-up, or longer: no warning
    train("lvlm", tiny_models["flan_t5"], prepared, tmp_path / "long", **{**QUIET_STEP, "log": messages.append})
    assert not [m for m in messages if m.startswith("warning")]


def test_all_samples_train_by_default(prepared, tiny_models, tmp_path):
    assert is_validation("img6", 0.02)  # a 2% hold-out would take one of the eight samples
    result = train("lvlm", tiny_models["flan_t5"], prepared, tmp_path, val_every=1, **QUIET_STEP)
    assert result["last"]["val_loss"] == ""  # nothing held out, so nothing validated (as the authors)


def test_each_process_draws_its_own_batch_of_batch_size_samples():
    keys = [f"k{i:02d}" for i in range(20)]
    batches = [batch_keys(keys, 4, 42, 7, process, 3) for process in range(3)]
    assert [len(b) for b in batches] == [4, 4, 4] and len(set(sum(batches, []))) == 12
    assert batches == [batch_keys(keys, 4, 42, 7, process, 3) for process in range(3)]  # so resuming is exact
    assert batch_keys(keys, 4, 42, 8, 0, 3) != batches[0]
    small = [batch_keys(keys[:5], 4, 0, 0, process, 2) for process in range(2)]  # fewer than 4 x 2 samples
    assert all(len(b) == len(set(b)) == 4 for b in small) and set(sum(small, [])) == set(keys[:5])


def test_captions_are_normalised_as_blips_caption_processor():
    assert blip_caption('A Dog: "Rex" (3) runs!  Fast...\n') == "a dog rex 3 runs fast"
    assert blip_caption("It's a well-known, red car? Yes") == "it's a well-known, red car? yes"
    assert blip_caption("red\tcar  ~#*;") == "red\tcar"  # only runs of two or more whitespace collapse
    assert blip_caption("~#*;") == ""
    words = [f"w{i}" for i in range(60)]
    assert blip_caption(" ".join(words)) == " ".join(words[:50])


def test_captions_split_at_a_random_word_and_one_word_ones_are_all_target():
    rng, reference = random.Random(3), random.Random(3)
    cut = reference.randint(1, 4)
    words = ["a", "red", "car", "on", "grass"]
    assert split_caption("a red car on grass", rng) == (" ".join(words[:cut]), " ".join(words[cut:]))
    assert split_caption("car", rng) == ("", "car") and split_caption("", rng) == ("", "")
    assert rng.random() == reference.random()  # a one-word caption draws nothing


def test_clip_data_keeps_one_word_captions_and_skips_images_without_one(tiny_models, tmp_path):
    from transformers import AutoTokenizer

    from thinkdiff_core.vision import VisionEncoder

    for n, caption in enumerate(["Dog.", "A RED car: fast!", None]):
        Image.new("RGB", (40, 30), (80 * n, 0, 0)).save(tmp_path / f"img{n}.png")
        if caption is not None:
            (tmp_path / f"img{n}.txt").write_text(caption)
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["flan_t5"])
    data = CLIPData(tmp_path, VisionEncoder.from_pretrained(tiny_models["blip2"], device="cpu"), tokenizer)
    assert {key: caption for key, (_, caption) in data.samples.items()} == {"img0": "dog", "img1": "a red car fast"}
    batch = data.batch(["img0"], random.Random(0), "cpu")
    assert batch["prefix_ids"][0].tolist() == tokenizer("").input_ids  # T5 reads an empty start: only </s>
    labels = batch["labels"][0]
    assert labels[labels != -100].tolist() == tokenizer("dog").input_ids


def test_a_folder_that_is_no_flan_t5_is_named(prepared, tiny_models, tmp_path):
    with pytest.raises(ValueError) as error:
        train("lvlm", tiny_models["vlm"], prepared, tmp_path / "run", steps=1, log=lambda _: None)
    assert str(error.value) == (f"{tiny_models['vlm']}: not a Flan-T5 folder (its config.json has model_type "
                                "'qwen2_vl'); --t5 expects one with model_type 't5', such as google/flan-t5-xxl")
    with pytest.raises(FileNotFoundError, match="no config.json; --t5 expects a Flan-T5 folder"):
        train("lvlm", tmp_path, prepared, tmp_path / "run", steps=1, log=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_resuming_continues_the_same_run(prepared, tiny_models, tmp_path):
    options = dict(steps=20, batch_size=4, lr=1e-2, min_lr=1e-3, warmup_steps=5, val_fraction=0.25, val_every=10,
                   save_every=10, log_every=1)
    whole = train("lvlm", tiny_models["flan_t5"], prepared, tmp_path / "whole", log=lambda _: None, **options)

    def stop_after_twelve(message):
        if message.startswith("step 12/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train("lvlm", tiny_models["flan_t5"], prepared, tmp_path / "cut", log=stop_after_twelve, **options)
    assert json.loads((tmp_path / "cut" / "trainer.json").read_text())["step"] == 10
    messages = []
    resumed = train("lvlm", tiny_models["flan_t5"], prepared, tmp_path / "cut", resume=True, log=messages.append,
                    **options)
    assert messages[0] == "resumed at step 10"
    for name, value in whole["aligner"].state_dict().items():
        torch.testing.assert_close(resumed["aligner"].state_dict()[name], value, rtol=0, atol=0)
    assert resumed["last"]["lr"] == whole["last"]["lr"] == learning_rate(19, 20, 1e-2, 1e-3, 1e-6, 5)
    rows = (tmp_path / "cut" / "log.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr,samples_per_s,val_loss" and rows[-1].startswith("20,")
    assert whole["last"]["val_loss"] != ""  # the optional held-out split is evaluated
    messages.clear()
    train("lvlm", tiny_models["flan_t5"], prepared, tmp_path / "cut", resume=True, log=messages.append, **options)
    assert messages == [f"{tmp_path / 'cut'} is already at step 20 of --steps 20: nothing to train"]

    log = (tmp_path / "cut" / "log.csv").read_text()
    with pytest.raises(FileExistsError) as error:  # without --resume: refused, nothing overwritten
        train("lvlm", tiny_models["flan_t5"], prepared, tmp_path / "cut", log=lambda _: None, **options)
    assert str(error.value) == (f"{tmp_path / 'cut'} holds a training run (trainer.json); pass --resume to "
                                f"continue it, or another --out to start a new one")
    assert (tmp_path / "cut" / "log.csv").read_text() == log
    (tmp_path / "cut" / "trainer.json").write_text("")  # e.g. the disk filled up while it was written
    record = tmp_path / "cut" / "trainer.json"
    with pytest.raises(ValueError, match=re.escape(f"{record} does not say which step to resume from (ValueError: "
                                                   f"{record} is empty (0 bytes) where the record of a training run "
                                                   f"is expected); continue in another --out")):
        train("lvlm", tiny_models["flan_t5"], prepared, tmp_path / "cut", resume=True, log=lambda _: None, **options)


def test_data_mistakes_are_reported_before_the_frozen_t5_loads(images, tiny_models, tmp_path, monkeypatch):
    import transformers

    def no_t5(*_args, **_kwargs):
        raise AssertionError("the frozen T5 was loaded")

    monkeypatch.setattr(transformers.T5ForConditionalGeneration, "from_pretrained", no_t5)
    with pytest.raises(ValueError, match=r"the clip variant needs --vision \(BLIP-2 vision file or folder\)"):
        train("clip", tiny_models["flan_t5"], images, tmp_path / "run", steps=1, log=lambda _: None)
    with pytest.raises(FileNotFoundError, match=f"no prepared shards \\(shard-\\*.safetensors\\) in {images}; "
                                                f"run prepare-lvlm"):
        train("lvlm", tiny_models["flan_t5"], images, tmp_path / "run", steps=1, log=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_clip_variant_trains_on_captioned_images(images, tiny_models, tmp_path):
    result = train("clip", tiny_models["flan_t5"], images, tmp_path, vision=tiny_models["blip2"], steps=3,
                   batch_size=4, val_fraction=0, save_every=3, log=lambda _: None)
    aligner = load_aligner(tmp_path / "aligner.safetensors")
    assert (aligner.in_features, aligner.out_features) == (48, 32) and result["last"]["step"] == 3
    with pytest.raises(ValueError, match="the clip variant needs --vision"):
        train("clip", tiny_models["flan_t5"], images, tmp_path / "x", steps=1, log=lambda _: None)


def test_the_trained_aligner_drives_the_nodes(prepared, tiny_models, tmp_path, host, car_images):
    train("lvlm", tiny_models["flan_t5"], prepared, tmp_path, steps=2, batch_size=4, val_fraction=0, save_every=2,
          log=lambda _: None)
    shutil.copy(tmp_path / "aligner.safetensors", host.models / "thinkdiff" / "trained_lvlm.safetensors")
    from test_nodes import image_tensor, node

    (aligner,) = node(host, "ThinkDiffLoadAligner").load("trained_lvlm.safetensors")
    (vlm,) = node(host, "ThinkDiffLoadVLM").load("Qwen-VL/Qwen2-VL-tiny", "fp32")
    output = node(host, "ThinkDiffReason").reason(
        vlm=vlm, aligner=aligner, clip=host.clip, words="white\nred", instruction="", seed=0, temperature=0.6,
        top_p=0.9, max_new_tokens=4, image_1=image_tensor(car_images[0]))
    assert output["result"][0][0][0].shape == (1, 4, 32)


@pytest.mark.slow
def test_prepare_and_train_commands(images, tiny_models, tmp_path):
    run = [sys.executable, "-m", "thinkdiff_core"]
    prepared = subprocess.run(run + ["prepare-lvlm", "--vlm", str(tiny_models["vlm"]), "--data", str(images), "--out",
                                     str(tmp_path / "prepared"), "--max-new-tokens", "4", "--limit", "3"],
                              cwd=REPO, capture_output=True, text=True, timeout=600)
    assert prepared.returncode == 0, prepared.stderr
    assert prepared.stdout.splitlines()[-1] == f"prepared 3 new samples; shards: {tmp_path / 'prepared'}"
    trained = subprocess.run(run + ["train", "--variant", "lvlm", "--t5", str(tiny_models["flan_t5"]), "--data",
                                    str(tmp_path / "prepared"), "--out", str(tmp_path / "run"), "--steps", "3",
                                    "--batch-size", "2", "--val-fraction", "0", "--save-every", "3", "--cpu",
                                    "--resume"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr
    assert f"--resume: no checkpoint in {tmp_path / 'run'} (no trainer.json), starting from step 0\n" in trained.stdout
    assert "step 3/3 loss" in trained.stdout and (tmp_path / "run" / "aligner.safetensors").is_file()
    assert trained.stdout.splitlines()[-1] == f"aligner: {tmp_path / 'run' / 'aligner.safetensors'}"
    missing = subprocess.run(run + ["train", "--variant", "lvlm", "--t5", str(tiny_models["flan_t5"]), "--data",
                                    str(tmp_path), "--out", str(tmp_path / "x")], cwd=REPO, capture_output=True,
                             text=True)
    assert missing.returncode == 2 and "no prepared shards" in missing.stderr
    no_steps = subprocess.run(run + ["train", "--variant", "lvlm", "--t5", str(tiny_models["flan_t5"]), "--data",
                                     str(tmp_path / "prepared"), "--out", str(tmp_path / "y"), "--steps", "0"],
                              cwd=REPO, capture_output=True, text=True)
    assert no_steps.returncode == 2 and "error: --steps must be 1 or more, got 0\n" in no_steps.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # nothing left behind
    again = subprocess.run(run + ["train", "--variant", "lvlm", "--t5", str(tiny_models["flan_t5"]), "--data",
                                  str(tmp_path / "prepared"), "--out", str(tmp_path / "run"), "--steps", "3", "--cpu"],
                           cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 2 and again.stderr == (f"error: {tmp_path / 'run'} holds a training run (trainer.json); "
                                                      f"pass --resume to continue it, or another --out to start a new "
                                                      f"one\n")


@pytest.mark.slow
def test_two_processes_with_accelerate_launch(prepared, tiny_models, tmp_path):
    from pathlib import Path

    import socket

    with socket.socket() as probe:  # a free port for the processes' rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launcher = Path(sys.executable).parent / "accelerate"
    # --multi_gpu without GPUs: torchrun starts both processes, on the CPU (accelerate's --cpu would start one).
    result = subprocess.run([str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                             "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
                             "-m", "thinkdiff_core", "train", "--variant",
                             "lvlm", "--t5", str(tiny_models["flan_t5"]), "--data", str(prepared), "--out",
                             str(tmp_path), "--steps", "4", "--batch-size", "4", "--val-fraction", "0", "--save-every",
                             "4", "--log-every", "2", "--cpu"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("step 4/4 loss") == 1  # logged by the main process only
    assert result.stdout.count("warning: --steps 4 is shorter than the warm-up") == 1
    assert result.stdout.splitlines()[-1] == f"aligner: {tmp_path / 'aligner.safetensors'}"
    assert result.stdout.count("aligner: ") == 1
    assert load_aligner(tmp_path / "aligner.safetensors").in_features == 64
    progress = json.loads((tmp_path / "trainer.json").read_text())
    assert progress["step"] == 4
    # Two processes: accelerate saved each one's random state.
    assert sorted(p.name for p in (tmp_path / progress["state"]).glob("random_states_*.pkl")) == [
        "random_states_0.pkl", "random_states_1.pkl"]


def test_weight_decay_skips_the_aligners_biases_and_norm(prepared, tiny_models, tmp_path, monkeypatch):
    made = []

    class SpyAdamW(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(torch.optim, "AdamW", SpyAdamW)
    result = train("lvlm", tiny_models["flan_t5"], prepared, tmp_path, weight_decay=0.05, **QUIET_STEP)
    names = {id(p): name for name, p in result["aligner"].named_parameters()}
    (optimizer,) = made
    groups = {group["weight_decay"]: sorted(names[id(p)] for p in group["params"]) for group in optimizer.param_groups}
    assert groups == {0.05: ["0.weight", "2.weight"], 0.0: ["0.bias", "2.bias", "3.weight"]}


def test_clip_loss_reads_the_image_tokens_before_the_encoded_caption_start(images, tiny_models):
    """BLIP-2's layout: T5 reads [aligned image tokens, T5-encoded caption start], then decodes the rest."""
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    from thinkdiff_core.aligner import Aligner
    from thinkdiff_core.commands.train import t5_loss
    from thinkdiff_core.vision import VisionEncoder

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["flan_t5"])
    t5 = T5ForConditionalGeneration.from_pretrained(tiny_models["flan_t5"]).eval()
    vision = VisionEncoder.from_pretrained(tiny_models["blip2"], device="cpu")
    data = CLIPData(images, vision, tokenizer)
    batch = data.batch(data.keys[:3], random.Random(1), "cpu")
    assert batch["prefix_mask"].eq(0).any()  # captions starts of different lengths: the mask matters
    torch.manual_seed(0)
    aligner = Aligner(vision.hidden_size, t5.config.d_model)

    calls = []

    class Spy:  # what t5_loss hands the T5 decoder
        encoder = t5.encoder

        def __call__(self, **kwargs):
            calls.append(kwargs)
            return t5(**kwargs)

    with torch.no_grad():
        loss = t5_loss(Spy(), aligner, batch)
        image = aligner(batch["states"])
        text = t5.encoder(input_ids=batch["prefix_ids"], attention_mask=batch["prefix_mask"]).last_hidden_state
        states = torch.cat([image, text], dim=1)
        mask = torch.cat([torch.ones(image.shape[:2], dtype=torch.long), batch["prefix_mask"]], dim=1)
        expected = t5(encoder_outputs=(states,), attention_mask=mask, labels=batch["labels"],
                      decoder_attention_mask=batch["decoder_mask"]).loss
    (call,) = calls
    torch.testing.assert_close(call["encoder_outputs"][0], states, rtol=0, atol=0)
    assert torch.equal(call["attention_mask"], mask) and torch.equal(call["labels"], batch["labels"])
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
