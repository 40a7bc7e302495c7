import json
import re

import pytest
import torch
from PIL import Image

from conftest import REPO
from thinkdiff_core import PAPER_INSTRUCTION, Reasoner
from thinkdiff_core.reason import final_norm

# The paper's instruction, written out so a change to the constant cannot go unnoticed.
INSTRUCTION = (
    "I give you several words and pictures. First, please analyse what the next picture is. Then give me a "
    "detailed diffusion prompt to describe the next picture. Please only provide me the detailed prompt and "
    "start the answer with 'Create an image'."
)
PICTURE = "<|vision_start|><|image_pad|><|vision_end|>"
HEAD = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
TAIL = "<|im_end|>\n<|im_start|>assistant\n"


def two_shot(car_images):
    white, blue = car_images
    return ["white", white, "blue", blue, "red"]


def test_two_shot_prompt_is_the_papers_exact_text(reasoner, car_images):
    prompt, images = reasoner.render_prompt(two_shot(car_images))
    assert PAPER_INSTRUCTION == INSTRUCTION
    assert prompt == (HEAD + INSTRUCTION + "\n\n"
                      f"Word 1: white, Picture 1: {PICTURE}"
                      f"\n\nWord 2: blue, Picture 2: {PICTURE}"
                      "\n\nWord 3: red, " + TAIL)
    assert images == list(car_images)


def test_text_only_and_image_only_sequences_use_the_papers_format(reasoner, car_images):
    prompt, images = reasoner.render_prompt(["sun", "moon", "star"])
    assert prompt == HEAD + INSTRUCTION + "\n\nWord 1: sun, \n\nWord 2: moon, \n\nWord 3: star, " + TAIL
    assert images == []
    prompt, images = reasoner.render_prompt(list(car_images))
    assert prompt == HEAD + INSTRUCTION + f"\n\nPicture 1: {PICTURE}Picture 2: {PICTURE}" + TAIL
    for items in (["sun", "moon"], list(car_images)):
        result = reasoner.reason(items, max_new_tokens=4)
        assert result.hidden_states.shape == (4, reasoner.hidden_size)
        assert torch.isfinite(result.hidden_states).all()


def test_custom_and_empty_instructions(reasoner):
    prompt, _ = reasoner.render_prompt(["a"], instruction="Think.")
    assert prompt == HEAD + "Think.\n\nWord 1: a, " + TAIL
    prompt, _ = reasoner.render_prompt(["a"], instruction="")
    assert prompt == HEAD + "Word 1: a, " + TAIL


def test_images_are_sized_by_qwen2_vl_smart_resize(reasoner):
    # 300x200 -> sides rounded to multiples of 28: 308x196 -> 22x14 patches of 14 px.
    prompt, images = reasoner.render_prompt(["x", Image.new("RGBA", (300, 200)), "y"])
    inputs = reasoner.prepare_inputs(prompt, images)
    assert inputs["image_grid_thw"].tolist() == [[1, 14, 22]]
    image_token = reasoner.model.config.image_token_id
    assert int((inputs["input_ids"] == image_token).sum()) == 14 * 22 // 4  # 2x2 patches merge per token


def test_bad_items_are_clear_errors(reasoner):
    with pytest.raises(ValueError, match="items is empty"):
        reasoner.reason([])
    with pytest.raises(ValueError, match="item 2 is an empty word"):
        reasoner.reason(["a", "  "])
    with pytest.raises(TypeError, match="item 1 is a int; expected a str"):
        reasoner.reason([3])
    with pytest.raises(TypeError, match="not a single item"):
        reasoner.reason("red")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        reasoner.reason(["a"], temperature=0)


def extend_inputs(inputs, token_ids):
    """The prompt's processor outputs with `token_ids` appended, for one full (teacher-forced) forward."""
    n = len(token_ids)
    extended = dict(inputs)
    for key, value in inputs.items():
        if torch.is_tensor(value) and value.dim() == 2 and value.shape == inputs["input_ids"].shape:
            tail = token_ids[None].to(value) if key == "input_ids" else (
                torch.ones(1, n, dtype=value.dtype) if key == "attention_mask" else torch.zeros(1, n, dtype=value.dtype))
            extended[key] = torch.cat([value, tail], dim=1)
    return extended


def test_states_are_the_final_norm_states_at_the_producing_positions(reasoner, car_images):
    n = 12
    result = reasoner.reason(two_shot(car_images), seed=3, max_new_tokens=n)
    assert result.hidden_states.shape == (n, reasoner.hidden_size) and result.hidden_states.dtype == torch.float32
    assert result.token_ids.shape == (n,)

    inputs = reasoner.prepare_inputs(*reasoner.render_prompt(two_shot(car_images)))
    prompt_length = inputs["input_ids"].shape[1]
    captured = []
    handle = final_norm(reasoner.model).register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        with torch.inference_mode():  # the prompt plus every generated token but the last, in one pass
            reasoner.model(**extend_inputs(inputs, result.token_ids[:-1]))
    finally:
        handle.remove()
    (full,) = captured
    expected = full[0, prompt_length - 1: prompt_length - 1 + n]
    torch.testing.assert_close(result.hidden_states, expected.float(), rtol=1e-4, atol=1e-4)


def reference_sampler(reasoner, items, seed, n, temperature=0.6, top_p=0.9):
    """The paper's sampler written out: EOS masked, temperature, nucleus, one multinomial draw per token."""
    inputs = reasoner.prepare_inputs(*reasoner.render_prompt(items))
    eos = torch.tensor(reasoner.eos_token_ids)
    tokens = torch.empty(0, dtype=torch.long)
    torch.manual_seed(seed)
    for _ in range(n):
        with torch.no_grad():
            logits = reasoner.model(**extend_inputs(inputs, tokens)).logits[0, -1].float()
        logits[eos] = -torch.inf
        logits = logits / temperature
        probs = logits.softmax(-1)
        sorted_probs, order = probs.sort(descending=True)
        in_nucleus = (sorted_probs.cumsum(0) - sorted_probs) < top_p  # mass before this token < top_p
        keep = torch.zeros_like(probs, dtype=torch.bool)
        keep[order[in_nucleus]] = True
        probs = logits.masked_fill(~keep, -torch.inf).softmax(-1)
        tokens = torch.cat([tokens, torch.multinomial(probs[None], 1)[0]])
    return tokens


def test_sampling_is_the_papers_not_the_released_generation_config(reasoner, car_images, tiny_models):
    # The folder's generation_config.json asks for top_k=1, top_p=0.001, repetition_penalty 1.05 (as
    # released); the paper's sampler ignores it.
    released = json.loads((tiny_models["vlm"] / "generation_config.json").read_text())
    assert released["top_k"] == 1 and released["repetition_penalty"] == 1.05
    items = two_shot(car_images)
    result = reasoner.reason(items, seed=11, max_new_tokens=10)
    assert result.token_ids.tolist() == reference_sampler(reasoner, items, seed=11, n=10).tolist()


def test_seeded_determinism(reasoner, car_images):
    items = two_shot(car_images)
    a = reasoner.reason(items, seed=5, max_new_tokens=16)
    b = reasoner.reason(items, seed=5, max_new_tokens=16)
    c = reasoner.reason(items, seed=6, max_new_tokens=16)
    assert torch.equal(a.token_ids, b.token_ids) and torch.equal(a.hidden_states, b.hidden_states)
    assert a.text == b.text and a.prompt == b.prompt
    assert not torch.equal(a.token_ids, c.token_ids)


def test_global_rng_is_left_alone(reasoner):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    reasoner.reason(["a"], seed=9, max_new_tokens=3)
    assert torch.equal(torch.rand(3), expected)


def test_exactly_max_new_tokens_even_when_the_model_wants_to_stop(reasoner):
    eos = reasoner.eos_token_ids

    def push_eos(module, inputs, logits):
        logits = logits.clone()
        logits[..., eos] += 1000.0
        return logits

    handle = reasoner.model.lm_head.register_forward_hook(push_eos)
    try:
        # Without the paper's EOS masking, generation stops at once.
        inputs = reasoner.prepare_inputs(*reasoner.render_prompt(["a"]))
        plain = reasoner.model.generate(**inputs, max_new_tokens=20, do_sample=True, eos_token_id=eos)
        assert plain.shape[1] - inputs["input_ids"].shape[1] == 1
        result = reasoner.reason(["a"], max_new_tokens=20)
        # The reference path (transformers' generate) masks EOS too.
        reference_tokens, reference_states = reasoner.sample(inputs, max_new_tokens=20, min_new_tokens=20, fast=False)
    finally:
        handle.remove()
    assert len(result.token_ids) == 20 and result.hidden_states.shape[0] == 20
    assert not set(result.token_ids.tolist()) & set(eos)
    assert len(reference_tokens) == 20 and reference_states.shape[0] == 20
    assert not set(reference_tokens.tolist()) & set(eos)


def test_on_token_reports_progress_and_can_stop_generation(reasoner):
    seen = []
    reasoner.reason(["a"], max_new_tokens=5, on_token=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]

    class Cancelled(Exception):
        pass

    def cancel(done, total):
        if done == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        reasoner.reason(["a"], max_new_tokens=5, on_token=cancel)
    assert len(final_norm(reasoner.model)._forward_hooks) == 0  # the hook is gone, the model still usable
    assert reasoner.reason(["a"], max_new_tokens=2).hidden_states.shape[0] == 2


def test_answer_text_is_the_decoded_tokens(reasoner):
    result = reasoner.reason(["a"], max_new_tokens=8)
    assert result.text == reasoner.processor.tokenizer.decode(result.token_ids, skip_special_tokens=True)


def test_folder_errors_name_the_path(tmp_path, tiny_models):
    with pytest.raises(FileNotFoundError, match=f"VLM folder not found: {tmp_path / 'missing'}"):
        Reasoner.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} is not a Hugging Face model folder: config.json"):
        Reasoner.from_pretrained(tmp_path)
    clip = tiny_models["flux"] / "text_encoder"
    with pytest.raises(ValueError, match=f"{clip} holds a 'clip_text_model' model; ThinkDiff-LVLM needs Qwen2-VL"):
        Reasoner.from_pretrained(clip)
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text((tiny_models["vlm"] / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="has config.json but no weight files"):
        Reasoner.from_pretrained(weightless)


def test_float16_is_refused_with_the_reason(tiny_models):
    with pytest.raises(ValueError, match="float16 is refused for Qwen2-VL: it overflows to NaN"):
        Reasoner.from_pretrained(tiny_models["vlm"], dtype=torch.float16)
    with pytest.raises(ValueError, match="float16 is refused"):
        Reasoner.from_pretrained(tiny_models["vlm"], dtype="fp16")


def test_bfloat16_reasoning_returns_float32_states(tiny_models):
    reasoner = Reasoner.from_pretrained(tiny_models["vlm"], device="cpu", dtype="bf16")
    assert reasoner.model.dtype == torch.bfloat16
    result = reasoner.reason(["a", "b"], max_new_tokens=3)
    assert result.hidden_states.dtype == torch.float32 and torch.isfinite(result.hidden_states).all()


def test_an_image_path_given_as_a_word_is_refused(reasoner):
    path = str(REPO / "workflows" / "white_car.png")
    with pytest.raises(ValueError, match=re.escape(f"item 2 is the path of an image file; pass the image, e.g. "
                                                   f"PIL.Image.open({path!r})")):
        reasoner.reason(["white", path, "red"], max_new_tokens=1)
    # A word that merely ends like an image name stays a word.
    assert reasoner.render_prompt(["white", "car.png", "red"])[1] == []
