"""ThinkDiff-LVLM nodes: load Qwen2-VL and the aligner, reason over words and images -> FLUX conditioning."""

from __future__ import annotations

import hashlib
import weakref

import torch

import comfy.model_management as mm
import comfy.utils

from ..thinkdiff_core import PAPER_INSTRUCTION, Reasoner, load_aligner
from ..thinkdiff_core.prompt import interleave
from ..thinkdiff_core.reason import FP16_REFUSAL
from . import folders, managed
from .images import to_pil

CATEGORY = "ThinkDiff"
PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32}
MAX_IMAGE_INPUTS = 8


class ThinkDiffVLM:
    """A loaded Qwen2-VL and its ModelPatcher (the THINKDIFF_VLM type)."""

    def __init__(self, reasoner: Reasoner, name: str):
        self.reasoner = reasoner
        self.name = name
        self.hidden_size = reasoner.hidden_size
        self.patcher = managed.manage(reasoner.model)


class ThinkDiffAligner:
    """A loaded aligner and its ModelPatcher (the THINKDIFF_ALIGNER type)."""

    def __init__(self, module, name: str):
        self.module = module
        self.name = name
        self.in_features, self.out_features = module.in_features, module.out_features
        self.patcher = managed.manage(module)


# One loaded copy per file and precision, however many loader nodes ask for it.
_loaded_vlms: "weakref.WeakValueDictionary[tuple, ThinkDiffVLM]" = weakref.WeakValueDictionary()
_loaded_aligners: "weakref.WeakValueDictionary[str, ThinkDiffAligner]" = weakref.WeakValueDictionary()


def _check_precision(precision: str):
    if precision.lower() in ("fp16", "float16", "half"):
        return FP16_REFUSAL
    if precision not in PRECISIONS:
        return f"precision must be one of {', '.join(PRECISIONS)}, got '{precision}'"
    return True


class ThinkDiffLoadVLM:
    DESCRIPTION = ("Loads Qwen2-VL (e.g. Qwen2-VL-7B-Instruct) from a folder under models/LLM or models/thinkdiff. "
                   "ComfyUI's memory manager moves it to the GPU only while it reasons.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("THINKDIFF_VLM",)
    RETURN_NAMES = ("vlm",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (list(folders.vlm_folders()), {"tooltip": "A Hugging Face folder holding config.json"}),
            "precision": (list(PRECISIONS), {"default": "bf16", "tooltip":
                          "bf16 as the paper (the aligner was trained on bf16 states); fp16 gives NaNs in Qwen2-VL"}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, model, precision):
        if model not in folders.vlm_folders():
            return folders.not_found("VLM folder", model, folders.VLM_KEYS)
        return _check_precision(precision)

    def load(self, model, precision):
        checked = _check_precision(precision)
        if checked is not True:
            raise ValueError(checked)
        path = folders.vlm_folders().get(model)
        if path is None:
            raise FileNotFoundError(folders.not_found("VLM folder", model, folders.VLM_KEYS))
        vlm = _loaded_vlms.get((path, precision))
        if vlm is None:
            reasoner = Reasoner.from_pretrained(path, device=mm.unet_offload_device(), dtype=PRECISIONS[precision])
            vlm = _loaded_vlms[(path, precision)] = ThinkDiffVLM(reasoner, model)
        return (vlm,)


class ThinkDiffLoadAligner:
    DESCRIPTION = "Loads a ThinkDiff aligner (.safetensors or the official .pth) from models/thinkdiff."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("THINKDIFF_ALIGNER",)
    RETURN_NAMES = ("aligner",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"aligner_name": (list(folders.aligner_files()),
                                              {"tooltip": "thinkdiff_lvlm.safetensors or thinkdiff_lvlm.pth"})}}

    @classmethod
    def VALIDATE_INPUTS(cls, aligner_name):
        if aligner_name not in folders.aligner_files():
            return folders.not_found("aligner", aligner_name, [folders.ALIGNER_KEY])
        return True

    def load(self, aligner_name):
        path = folders.aligner_files().get(aligner_name)
        if path is None:
            raise FileNotFoundError(folders.not_found("aligner", aligner_name, [folders.ALIGNER_KEY]))
        aligner = _loaded_aligners.get(path)
        if aligner is None:
            aligner = _loaded_aligners[path] = ThinkDiffAligner(load_aligner(path), aligner_name)
        return (aligner,)


def parse_words(text: str) -> list[str]:
    """One word (or phrase) per line; surrounding blank lines are ignored, inner ones are errors."""
    lines = text.strip().splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise ValueError(f"word {number} is empty: write one word per line, without blank lines")
    return [line.strip() for line in lines]


def _fingerprint(tensor: torch.Tensor) -> str:
    data = tensor.detach().float().cpu().contiguous()
    return f"{tuple(data.shape)}:{hashlib.sha256(data.numpy().tobytes()).hexdigest()}"


class ThinkDiffReason:
    DESCRIPTION = ("ThinkDiff-LVLM: Qwen2-VL reasons over the words and images in order (word 1, image 1, ..., "
                   "query word), the aligner maps the states of its 128 generated tokens into T5 space, and the "
                   "result is FLUX conditioning (the T5 slot; pooled = CLIP-L of the empty string).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING", "STRING")
    RETURN_NAMES = ("conditioning", "answer")
    OUTPUT_TOOLTIPS = ("FLUX conditioning: plug into FluxGuidance / KSampler positive",
                       "Qwen2-VL's answer, a by-product of the reasoning")
    FUNCTION = "reason"

    @classmethod
    def INPUT_TYPES(cls):
        images = {f"image_{i}": ("IMAGE", {"tooltip": "the image after word " + str(i) + "; a batch counts as "
                                           "several images in order"}) for i in range(1, MAX_IMAGE_INPUTS + 1)}
        return {
            "required": {
                "vlm": ("THINKDIFF_VLM",),
                "aligner": ("THINKDIFF_ALIGNER",),
                "clip": ("CLIP", {"tooltip": "FLUX's CLIP (DualCLIPLoader, type flux): pooled CLIP-L of \"\""}),
                "words": ("STRING", {"multiline": True, "default": "white\nblue\nred", "tooltip":
                          "One word per line: one per image, in order, then the query word"}),
                "instruction": ("STRING", {"multiline": True, "default": PAPER_INSTRUCTION}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}),
                "temperature": ("FLOAT", {"default": 0.6, "min": 0.01, "max": 2.0, "step": 0.05}),
                "top_p": ("FLOAT", {"default": 0.9, "min": 0.01, "max": 1.0, "step": 0.05}),
                "max_new_tokens": ("INT", {"default": 128, "min": 1, "max": 1024, "tooltip":
                                   "The paper generates (and aligns) exactly 128 tokens"}),
            },
            "optional": images,
        }

    def __init__(self):
        self._last = None  # (key, output): a repeat with identical inputs returns it without generating

    def reason(self, vlm, aligner, clip, words, instruction, seed, temperature, top_p, max_new_tokens, **images):
        batches = [(name, images[name]) for name in sorted(images, key=lambda n: int(n.split("_")[1]))
                   if images[name] is not None]
        if not batches:
            raise ValueError("no images connected: connect image_1 (and image_2, ...) for the words' images")
        pictures = [picture for name, batch in batches for picture in to_pil(batch, name)]
        items = interleave(parse_words(words), pictures)
        if aligner.in_features != vlm.hidden_size:
            raise ValueError(f"aligner '{aligner.name}' takes {aligner.in_features}-d states but the VLM "
                             f"'{vlm.name}' has hidden size {vlm.hidden_size}; use the aligner trained for this VLM")

        key = (weakref.ref(vlm), weakref.ref(aligner), weakref.ref(clip), words, instruction, seed, temperature,
               top_p, max_new_tokens, tuple((name, _fingerprint(batch)) for name, batch in batches))
        if self._last is not None and self._last[0] == key:
            return self._last[1]

        t5, pooled = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
        if aligner.out_features != t5.shape[-1]:
            raise ValueError(f"aligner '{aligner.name}' outputs {aligner.out_features}-d tokens but this CLIP's T5 "
                             f"encodes {t5.shape[-1]}-d; load FLUX's text encoders (DualCLIPLoader, type flux)")

        progress = comfy.utils.ProgressBar(max_new_tokens)

        def on_token(done, total):
            mm.throw_exception_if_processing_interrupted()
            progress.update_absolute(done, total)

        managed.load(vlm.patcher, aligner.patcher)
        result = vlm.reasoner.reason(items, instruction=instruction, seed=seed, temperature=temperature,
                                     top_p=top_p, max_new_tokens=max_new_tokens, on_token=on_token)
        with torch.inference_mode():
            aligned = aligner.module(result.hidden_states)
        device, dtype = mm.intermediate_device(), mm.intermediate_dtype()
        conditioning = [[aligned.unsqueeze(0).to(device=device, dtype=dtype),
                         {"pooled_output": pooled.to(device=device, dtype=dtype)}]]
        output = {"ui": {"text": [result.text]}, "result": (conditioning, result.text)}
        self._last = (key, output)
        return output
