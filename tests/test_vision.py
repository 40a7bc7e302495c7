import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import REPO
from thinkdiff_core import VisionEncoder, convert_to_safetensors, extract_vision, load_aligner
from thinkdiff_core import compose
from thinkdiff_core.commands.demo import run_demo
from thinkdiff_core.render import load_flux
from thinkdiff_core.vision import downsample_tokens

MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])


@pytest.fixture(scope="module")
def vision(tiny_models):
    return VisionEncoder.from_pretrained(tiny_models["blip2"], device="cpu")


@pytest.fixture(scope="module")
def pipe(tiny_models):
    return load_flux(tiny_models["flux"], device="cpu")


def reference_pixels(image):
    """BLIP-2's preprocessing written out: RGB, bicubic resize to 224x224, /255, CLIP mean/std, CHW."""
    pixels = np.asarray(image.convert("RGB").resize((224, 224), Image.BICUBIC)).astype(np.float64) / 255
    return torch.from_numpy(((pixels - MEAN) / STD).transpose(2, 0, 1)).float()


def test_bilinear_16_to_8_is_the_2x2_average_and_cls_stays_first():
    hidden = torch.randn(3, 257, 5, generator=torch.Generator().manual_seed(0))
    out = downsample_tokens(hidden)
    assert out.shape == (3, 65, 5)
    torch.testing.assert_close(out[:, 0], hidden[:, 0])
    grid = hidden[:, 1:].reshape(3, 16, 16, 5).permute(0, 3, 1, 2)
    expected = F.avg_pool2d(grid, 2).permute(0, 2, 3, 1).reshape(3, 64, 5)  # half-pixel bilinear at scale 2
    torch.testing.assert_close(out[:, 1:], expected)


def test_encode_is_the_papers_procedure(vision, car_images):
    from transformers import Blip2VisionModel

    images = [car_images[0], Image.new("RGB", (300, 120), (200, 30, 90))]  # non-square: squashed to 224x224
    tokens = vision.encode(images)
    assert tokens.shape == (2, 65, vision.hidden_size) and tokens.dtype == torch.float32
    pixels = torch.stack([reference_pixels(i) for i in images])
    processed = vision.image_processor(images=images, return_tensors="pt").pixel_values
    torch.testing.assert_close(processed, pixels, rtol=0, atol=1e-5)
    model: Blip2VisionModel = vision.model
    with torch.no_grad():
        hidden = model(pixel_values=processed).last_hidden_state  # post-layernorm, [2, 257, d]
    assert hidden.shape[1] == 257
    grid = hidden[:, 1:].reshape(2, 16, 16, -1).permute(0, 3, 1, 2)
    expected = torch.cat([hidden[:, :1], F.avg_pool2d(grid, 2).permute(0, 2, 3, 1).reshape(2, 64, -1)], dim=1)
    torch.testing.assert_close(tokens, expected)


def test_tiny_non_square_rgba_and_grayscale_images_encode(vision):
    images = [Image.new("RGB", (20, 300)), Image.new("RGBA", (5, 5), (255, 0, 0, 128)), Image.new("L", (224, 10))]
    assert vision.encode(images).shape == (3, 65, vision.hidden_size)
    with pytest.raises(ValueError, match="no images to encode"):
        vision.encode([])


def test_folder_loading_reads_only_the_vision_tower(tiny_models, monkeypatch):
    opened, read = [], []
    original = safetensors.safe_open

    class Recording:
        def __init__(self, path, *args, **kwargs):
            opened.append(path)
            self.inner = original(path, *args, **kwargs)

        def __enter__(self):
            self.handle = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.handle.keys()

        def metadata(self):
            return self.handle.metadata()

        def get_tensor(self, key):
            read.append(key)
            return self.handle.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    VisionEncoder.from_pretrained(tiny_models["blip2"], device="cpu")
    assert read and all(key.startswith("vision_model.") for key in read)
    assert not any(path.endswith("model-00003-of-00003.safetensors") for path in opened)  # the T5 shard


def test_extract_vision_round_trip(tmp_path, tiny_models, vision, car_images):
    out = tmp_path / "blip2_vision.safetensors"
    result = subprocess.run([sys.executable, "-m", "thinkdiff_core", "extract-vision", str(tiny_models["blip2"]),
                             str(out)], cwd=REPO, capture_output=True, text=True, check=True,
                            preexec_fn=lambda: os.umask(0o022))
    report = json.loads(result.stdout)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # readable by a ComfyUI running as another user
    assert report["hidden_size"] == vision.hidden_size and report["output_bytes"] == out.stat().st_size
    with safetensors.safe_open(str(out), framework="pt") as f:
        assert all(k.startswith("vision_model.") for k in f.keys())
        assert json.loads(f.metadata()["vision_config"])["hidden_size"] == vision.hidden_size
    extracted = VisionEncoder.from_pretrained(out, device="cpu")
    assert torch.equal(extracted.encode(list(car_images)), vision.encode(list(car_images)))


def test_files_that_are_not_a_blip2_vision_tower_are_clear_errors(tmp_path, tiny_models):
    aligner_file = tmp_path / "aligner_clip.safetensors"
    convert_to_safetensors(tiny_models["aligner_clip"], aligner_file)
    with pytest.raises(ValueError, match=r"aligner_clip\.safetensors: not a BLIP-2 vision tower\. Expected the EVA "
                                         r"ViT keys vision_model\.embeddings\.\*"):
        VisionEncoder.from_pretrained(aligner_file)
    clip_vision = tmp_path / "clip_vision_h.safetensors"  # CLIP vision towers use q/k/v projections, not qkv
    safetensors.torch.save_file({"vision_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2)},
                                str(clip_vision))
    with pytest.raises(ValueError, match="not a BLIP-2 vision tower.*found vision_model.encoder.layers.0.self_attn"):
        VisionEncoder.from_pretrained(clip_vision)
    with pytest.raises(ValueError, match="holds a 'qwen2_vl' model; ThinkDiff-CLIP needs BLIP-2"):
        VisionEncoder.from_pretrained(tiny_models["vlm"])
    with pytest.raises(FileNotFoundError, match="vision encoder not found"):
        VisionEncoder.from_pretrained(tmp_path / "missing.safetensors")
    with pytest.raises(NotADirectoryError, match="expected a BLIP-2 Hugging Face folder"):
        extract_vision(clip_vision, tmp_path / "x.safetensors")


def test_two_images_and_text_in_order_with_the_prompts_pooled_vector(vision, pipe, tiny_models, car_images):
    aligner = load_aligner(tiny_models["aligner_clip"])
    first, second = car_images
    tokens = compose.image_tokens(vision, aligner, [first, second])
    assert tokens.shape == (130, aligner.out_features)
    prompt = "on a beach"
    prompt_embeds, pooled = compose.flux_inputs(pipe, tokens, prompt)
    assert prompt_embeds.shape == (1, 65 + 65 + 128, aligner.out_features)  # T5 padded to the paper's 128
    torch.testing.assert_close(prompt_embeds[0, :65], aligner(vision.encode([first]))[0])
    torch.testing.assert_close(prompt_embeds[0, 65:130], aligner(vision.encode([second]))[0])
    text, text_pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, max_sequence_length=128)
    torch.testing.assert_close(prompt_embeds[:, 130:], text)
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(pooled, pipe.text_encoder(ids).pooler_output)


def test_the_lvlm_aligner_in_the_clip_variant_is_a_clear_error(vision, tiny_models, car_images):
    with pytest.raises(ValueError, match=r"aligner takes 64-d features but the vision encoder gives 48-d; "
                                         r"ThinkDiff-CLIP needs its own aligner"):
        compose.image_tokens(vision, load_aligner(tiny_models["aligner"]), list(car_images))


@pytest.mark.parametrize("prompt", ["", "wearing pink sunglasses on a beach"])
def test_demo_composes_on_the_tiny_models(tmp_path, tiny_models, prompt):
    report = run_demo(tiny_models["vlm"].parent, tmp_path, variant="clip", prompt=prompt, steps=2, size=64,
                      log=lambda _: None)
    assert report["conditioning_tokens"] == 2 * 65 + 128 and report["prompt"] == prompt
    assert report["vision"] == str(tiny_models["blip2"]) and report["aligner"] == str(tiny_models["aligner_clip"])
    assert Image.open(tmp_path / "image.png").size == (64, 64)
    assert not (tmp_path / "answer.txt").exists()
