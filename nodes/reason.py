"""ThinkDiff-LVLM: Qwen2-VL reasons over words and images; its generated-token states take T5-XXL's place in the
conditioning of the connected CLIP's family."""

from __future__ import annotations

import hashlib
import weakref

import torch

import comfy.model_management as mm
import comfy.utils

from ..thinkdiff_core import PAPER_INSTRUCTION
from ..thinkdiff_core.prompt import check_items, check_plain_text, interleave
from ..thinkdiff_core.reason import check_sampling, variation_seeds
from . import families, managed
from .images import collect, pictures
from .loaders import CATEGORY

MAX_IMAGE_INPUTS = 8
MAX_VARIATIONS = 16


def parse_words(text: str) -> list[str]:
    """One word (or phrase) per line; surrounding blank lines are ignored, inner ones are errors."""
    if not isinstance(text, str):
        raise ValueError(f"words must be a string (one word per line), got a {type(text).__name__}")
    lines = text.strip().splitlines()
    if not lines:
        raise ValueError("words is empty: write one word per line (one per image, in order, then the query word)")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise ValueError(f"word {number} is empty: write one word per line, without blank lines")
    return [line.strip() for line in lines]


def fingerprint(batches: list[tuple[str, torch.Tensor]]) -> tuple:
    """What the image inputs hold, to tell a repeat from a change."""
    digests = []
    for name, batch in batches:
        data = batch.detach().float().cpu().contiguous()
        digests.append((name, tuple(data.shape), hashlib.sha256(data.numpy().tobytes()).hexdigest()))
    return tuple(digests)


# ComfyUI's encoding of "" per CLIP object: the layout around T5 (SD3's CLIP-L/G part, the pooled vector) of
# every run, without a text-encoder pass each time. Weak keys: an unloaded CLIP is forgotten.
_empty_prompt: "weakref.WeakKeyDictionary[object, families.TextEncoding]" = weakref.WeakKeyDictionary()


def encode_empty_prompt(clip) -> families.TextEncoding:
    try:
        return _empty_prompt[clip]
    except (KeyError, TypeError):  # TypeError: an object that cannot be weakly referenced
        pass
    encoded = families.encode(clip, clip.tokenize(""))
    try:
        _empty_prompt[clip] = encoded
    except TypeError:
        pass
    return encoded


def answers(results) -> str:
    """The answer, or with variations each under its seed (as the seed widget would reproduce it)."""
    if len(results) == 1:
        return results[0].text
    return "\n\n".join(f"variation {i} (seed {result.seed}):\n{result.text}" for i, result in enumerate(results, 1))


class ThinkDiffReason:
    DESCRIPTION = ("ThinkDiff-LVLM: Qwen2-VL reasons over the words and images in order (word 1, image 1, ..., "
                   "query word), the aligner maps the states of its 128 generated tokens into T5-XXL space, and the "
                   "result is text conditioning with them in T5's place, laid out as the connected CLIP's family "
                   "lays out an empty prompt (FLUX.1: pooled = CLIP-L of \"\"; SD3/3.5: CLIP-L/G's part of \"\" "
                   "first; Chroma, LTX-Video, Mochi, CogVideoX: T5 only). The paper measured FLUX.1.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING", "STRING")
    RETURN_NAMES = ("conditioning", "answer")
    OUTPUT_TOOLTIPS = ("Text conditioning for the CLIP's model: the aligned states of the max_new_tokens generated "
                       "tokens in T5's place, the rest as that CLIP encodes \"\"; use it as a CLIPTextEncode output "
                       "(FLUX: into FluxGuidance). A batch of one row per variation: give the latent that batch size "
                       "(latent i is drawn from variation i)",
                       "The VLM's answer, also shown on the node (with variations, each under its seed): a "
                       "by-product, the conditioning comes from its token states, not from encoding this text")
    FUNCTION = "reason"
    # Where ComfyUI supports it (0.33 does, 0.3.64 does not), it resends the answer shown on the node when a
    # run is served from its cache, as for output nodes, without running this node unless an output needs it.
    HAS_INTERMEDIATE_OUTPUT = True

    @classmethod
    def INPUT_TYPES(cls):
        images = {f"image_{i}": ("IMAGE", {"tooltip": f"The image after word {i}; a batch counts as several images, "
                                           "in order"}) for i in range(1, MAX_IMAGE_INPUTS + 1)}
        return {
            "required": {
                "vlm": ("THINKDIFF_VLM", {"tooltip": "Qwen2-VL (Load ThinkDiff VLM): reads the words and images and "
                                         "generates the answer whose token states become the conditioning"}),
                "aligner": ("THINKDIFF_ALIGNER", {"tooltip": "The thinkdiff_lvlm aligner (Load ThinkDiff Aligner): "
                                                 "maps the VLM's states into T5-XXL's space"}),
                "clip": ("CLIP", {"tooltip": "The image or video model's text encoders, T5-XXL among them (FLUX.1, "
                                  "SD3/3.5, Chroma, LTX-Video, Mochi, CogVideoX): only its encoding of the empty "
                                  "prompt is used (FLUX: CLIP-L's pooled vector, as in the paper), T5's tokens are "
                                  "replaced"}),
                "words": ("STRING", {"multiline": True, "default": "white\nblue\nred", "tooltip":
                          "One word per line: one per image, in order, then the query word"}),
                "instruction": ("STRING", {"multiline": True, "default": PAPER_INSTRUCTION, "tooltip":
                                "What the VLM is asked before the words and images; the default is the paper's "
                                "(answers start with 'Create an image')"}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "Seed of the VLM's sampling: the same seed and inputs give the same "
                                 "answer (with uncompiled decoding, always; see the VLM loader)"}),
                "temperature": ("FLOAT", {"default": 0.6, "min": 0.01, "max": 2.0, "step": 0.05, "tooltip":
                                "Sampling temperature: lower is more predictable, higher more varied; 0.6 = the "
                                "paper"}),
                "top_p": ("FLOAT", {"default": 0.9, "min": 0.01, "max": 1.0, "step": 0.05, "tooltip":
                          "Nucleus sampling: each token is drawn from the most likely ones that together reach "
                          "this probability; 1.0 = from all; 0.9 = the paper"}),
                "max_new_tokens": ("INT", {"default": 128, "min": 1, "max": 1024, "tooltip":
                                   "How many tokens the VLM generates, exactly (it never stops early); each becomes "
                                   "one conditioning token. 128 = the paper; the aligner was trained on at most 128"}),
            },
            "optional": {
                # Optional, so that workflows and API prompts saved before it still load (as 1).
                "variations": ("INT", {"default": 1, "min": 1, "max": MAX_VARIATIONS, "tooltip":
                               "How many samplings of the reasoning, decoded together in one pass (on a GPU 4 "
                               "cost little more than 1): variation i uses seed + i, and the conditioning holds a "
                               "row per variation. Set the latent's batch_size to the same number: ComfyUI draws "
                               "latent i from row i, and a latent batch of 1 only from the first"}),
                **images,
            },
        }

    def __init__(self):
        self._last = None  # (key, output): a repeat with identical inputs returns it without generating

    def reason(self, vlm, aligner, clip, words, instruction, seed, temperature, top_p, max_new_tokens, variations=1,
               **images):
        batches = collect(images, MAX_IMAGE_INPUTS)
        items = interleave(parse_words(words), pictures(batches))
        if not isinstance(instruction, str):
            raise ValueError(f"instruction must be a string, got a {type(instruction).__name__}")
        # Before anything loads: a prompt sent over HTTP may hold any value, and words that would add chat turns
        # or image slots are refused (the core checks the rendered chat again).
        families.detect(clip)
        check_sampling(seed, temperature, top_p, max_new_tokens)
        seeds = variation_seeds(seed, variations)
        if variations > MAX_VARIATIONS:
            raise ValueError(f"variations must be at most {MAX_VARIATIONS}, got {variations}")
        check_items(items)
        check_plain_text(vlm.reasoner.processor.tokenizer, items, instruction)
        if aligner.in_features != vlm.hidden_size:
            raise ValueError(aligner.mismatch(vlm.hidden_size, f"the VLM '{vlm.name}' (hidden size {vlm.hidden_size})"))

        # The loader switches `compile` in place on the same VLM, so it is part of the key.
        key = (weakref.ref(vlm), vlm.reasoner.compile, weakref.ref(aligner), weakref.ref(clip), words, instruction,
               seed, temperature, top_p, max_new_tokens, variations, fingerprint(batches))
        if self._last is not None and self._last[0] == key:
            return self._last[1]

        empty = encode_empty_prompt(clip)
        if aligner.out_features != empty.width:
            raise ValueError(f"aligner '{aligner.name}' outputs {aligner.out_features}-d tokens but this CLIP "
                             f"({empty.family.name}) encodes {empty.width}-d; ThinkDiff's aligners map into T5-XXL's "
                             "space")

        reasoner = vlm.reasoner
        # The prompt is processed before the VLM loads: its length sizes the memory the decoding needs.
        prompt, pictures_in_order = reasoner.render_prompt(items, instruction)
        inputs = reasoner.prepare_inputs(prompt, pictures_in_order)
        # The fast path decodes the variations together (a step per token), the plain one after one another.
        steps = max_new_tokens * (1 if reasoner.fast else variations)
        progress = comfy.utils.ProgressBar(steps)

        def on_token(done, total):
            mm.throw_exception_if_processing_interrupted()
            progress.update_absolute(done, total)

        managed.load(vlm.patcher, aligner.patcher,
                     memory_required=reasoner.decode_memory(inputs["input_ids"].shape[1], max_new_tokens, variations))
        results = reasoner.decode_variations(prompt, inputs, seeds, temperature, top_p, max_new_tokens, max_new_tokens,
                                             on_token)
        with torch.inference_mode():
            aligned = torch.stack([aligner.module(result.hidden_states) for result in results])
        device, dtype = managed.intermediate()
        conditioning = empty.conditioning(aligned.to(device=device, dtype=dtype))
        answer = answers(results)
        output = {"ui": {"text": [answer]}, "result": (conditioning, answer)}
        self._last = (key, output)
        return output
