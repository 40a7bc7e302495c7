"""Loaders: Qwen2-VL, BLIP-2's vision tower and the aligners, each handed to ComfyUI's memory manager."""

from __future__ import annotations

import importlib.util
import os
import weakref

import torch

import comfy.model_management as mm

from ..thinkdiff_core import Reasoner, VisionEncoder, load_aligner
from ..thinkdiff_core.aligner import width_mismatch
from ..thinkdiff_core.reason import FP16_REFUSAL, quantized_size
from . import folders, managed

CATEGORY = "ThinkDiff"
PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32}
PRECISION_TOOLTIP = "bf16 as the paper (the aligners were trained on bf16 features); fp16 is refused"
# The VLM may also load bitsandbytes-quantised, for GPUs of 24 GB or less (language model only).
QUANTIZED = {"8-bit (bitsandbytes)": "8bit", "4-bit (bitsandbytes)": "4bit"}
VLM_PRECISIONS = (*PRECISIONS, *QUANTIZED)
VLM_PRECISION_TOOLTIP = (PRECISION_TOOLTIP + ". 8-bit / 4-bit need bitsandbytes, load straight onto the GPU and stay "
                         "there; their states drift from the bf16 ones the aligner was trained on")
# How the VLM decodes: the Reasoner's `compile` setting.
DECODINGS = {"compiled": None, "uncompiled": False}
DECODING_TOOLTIP = ("compiled: the fastest reasoning, on NVIDIA GPUs with Triton, once a one-time compilation that "
                    "starts after the first run has finished (once per ComfyUI session: a VLM loaded again reuses "
                    "it); that first run decodes uncompiled and rounds differently, so its answer for a seed can "
                    "differ from later runs'. uncompiled: every run decodes alike (a seed always gives the same "
                    "answer), more slowly")


class ThinkDiffVLM:
    """A loaded Qwen2-VL and its ModelPatcher (the THINKDIFF_VLM type)."""

    def __init__(self, reasoner: Reasoner, name: str, quantized: bool = False):
        self.reasoner = reasoner
        self.name = name
        self.hidden_size = reasoner.hidden_size
        self.patcher = managed.manage(reasoner.model, on_move=reasoner.release, movable=not quantized)


class ThinkDiffVision:
    """A loaded BLIP-2 vision tower and its ModelPatcher (the THINKDIFF_VISION type)."""

    def __init__(self, encoder: VisionEncoder, name: str):
        self.encoder = encoder
        self.name = name
        self.hidden_size = encoder.hidden_size
        self.patcher = managed.manage(encoder.model)


class ThinkDiffAligner:
    """A loaded aligner and its ModelPatcher (the THINKDIFF_ALIGNER type)."""

    def __init__(self, module, name: str):
        self.module = module
        self.name = name
        self.in_features, self.out_features = module.in_features, module.out_features
        self.patcher = managed.manage(module)

    def mismatch(self, width: int, source: str) -> str:
        """The error for feeding this aligner `width`-d features from `source`."""
        return width_mismatch(f"'{self.name}'", self.in_features, source, width)


# One loaded copy per file and precision, however many loader nodes ask for it.
_loaded: "weakref.WeakValueDictionary[tuple, object]" = weakref.WeakValueDictionary()


def _check_precision(precision, choices=tuple(PRECISIONS)):
    if isinstance(precision, str) and precision.lower() in ("fp16", "float16", "half"):
        return FP16_REFUSAL
    if precision not in choices:
        return f"precision must be one of {', '.join(choices)}, got {precision!r}"
    return True


def _find(models: dict[str, str], name: str, what: str, keys, precision: str | None = None) -> str:
    """The path of the chosen model; a missing one or a refused precision is a clear error."""
    if precision is not None and (problem := _check_precision(precision)) is not True:
        raise ValueError(problem)
    if name not in models:
        message = folders.not_found(what, name, keys)
        stem, suffix = os.path.splitext(name)
        # A workflow names the official .pth; the user may have converted it to .safetensors (or back).
        twin = {".pth": ".safetensors", ".safetensors": ".pth"}.get(suffix)
        if twin and stem + twin in models:
            message += f"; '{stem + twin}' is there: select it in the loader"
        raise FileNotFoundError(message)
    return models[name]


def _validate(models: dict[str, str], name: str | None, what: str, keys, precision: str | None = None) -> bool | str:
    """VALIDATE_INPUTS' answer: True, or the message ComfyUI shows before anything runs.

    An input given by a link is None while ComfyUI validates; it is checked when the loader runs.
    """
    if name is None:
        return True if precision is None else _check_precision(precision)
    try:
        _find(models, name, what, keys, precision)
    except (ValueError, FileNotFoundError) as error:
        return str(error)
    return True


def _load_once(key: tuple, build):
    loaded = _loaded.get(key)
    if loaded is None:
        loaded = _loaded[key] = build()
    return loaded


class ThinkDiffLoadVLM:
    DESCRIPTION = ("Loads Qwen2-VL (e.g. Qwen2-VL-7B-Instruct) from a folder under models/LLM or models/thinkdiff. "
                   "ComfyUI's memory manager moves it to the GPU only while it reasons.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("THINKDIFF_VLM",)
    RETURN_NAMES = ("vlm",)
    OUTPUT_TOOLTIPS = ("The loaded Qwen2-VL, for ThinkDiff Reason's vlm input",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (list(folders.vlm_folders()), {"tooltip": "A Qwen2-VL Hugging Face folder (e.g. "
                          "Qwen2-VL-7B-Instruct) in models/LLM or models/thinkdiff"}),
                "precision": ([*PRECISIONS, *QUANTIZED], {"default": "bf16", "tooltip": VLM_PRECISION_TOOLTIP}),
            },
            # Optional: API prompts saved before it existed still run (ComfyUI fills in no defaults).
            "optional": {
                "decoding": (list(DECODINGS), {"default": "compiled", "tooltip": DECODING_TOOLTIP, "advanced": True}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, model, precision):
        if precision is not None and precision not in VLM_PRECISIONS:
            return _check_precision(precision, VLM_PRECISIONS)
        if precision in QUANTIZED:
            if importlib.util.find_spec("bitsandbytes") is None:
                return f"precision '{precision}' needs bitsandbytes: pip install bitsandbytes"
            return _validate(folders.vlm_folders(), model, "Qwen2-VL folder", folders.VLM_KEYS)
        return _validate(folders.vlm_folders(), model, "Qwen2-VL folder", folders.VLM_KEYS, precision)

    def load(self, model, precision, decoding="compiled"):
        # A linked value skips ComfyUI's choice checks.
        if precision not in VLM_PRECISIONS:
            raise ValueError(_check_precision(precision, VLM_PRECISIONS))
        if decoding not in tuple(DECODINGS):
            raise ValueError(f"decoding must be one of {', '.join(DECODINGS)}, got {decoding!r}")
        quantization = QUANTIZED.get(precision)
        path = _find(folders.vlm_folders(), model, "Qwen2-VL folder", folders.VLM_KEYS,
                     None if quantization else precision)

        def build():
            if quantization:  # quantised on the compute device, where it stays
                device = mm.get_torch_device()
                # Models ComfyUI keeps there (FLUX from a previous run) make room first, as for its own loads.
                mm.free_memory(quantized_size(path, quantization) + mm.minimum_inference_memory(), device)
                reasoner = Reasoner.from_pretrained(path, device=device, dtype=torch.bfloat16,
                                                    quantization=quantization)
            else:
                reasoner = Reasoner.from_pretrained(path, device=mm.unet_offload_device(),
                                                    dtype=PRECISIONS[precision])
            return ThinkDiffVLM(reasoner, model, quantized=quantization is not None)

        loaded = _load_once(("vlm", path, precision), build)
        loaded.reasoner.compile = DECODINGS[decoding]  # switched in place: no reload
        return (loaded,)


class ThinkDiffLoadVisionEncoder:
    DESCRIPTION = ("Loads BLIP-2's vision tower for ThinkDiff-CLIP: a file made by `python -m thinkdiff_core "
                   "extract-vision` (models/thinkdiff or models/clip_vision) or a whole Salesforce/blip2-flan-t5-xxl "
                   "folder (only its vision tensors are read).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("THINKDIFF_VISION",)
    RETURN_NAMES = ("vision",)
    OUTPUT_TOOLTIPS = ("BLIP-2's vision tower, for ThinkDiff Compose's vision input",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vision_name": (list(folders.vision_models()), {"tooltip":
                            "blip2_vision.safetensors (models/thinkdiff or models/clip_vision) or a BLIP-2 folder"}),
            "precision": (list(PRECISIONS), {"default": "bf16", "tooltip": PRECISION_TOOLTIP}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, vision_name, precision):
        return _validate(folders.vision_models(), vision_name, "BLIP-2 vision encoder", folders.VISION_KEYS, precision)

    def load(self, vision_name, precision):
        if precision not in PRECISIONS:  # a linked value skips ComfyUI's choice check (and None _find's)
            raise ValueError(_check_precision(precision))
        path = _find(folders.vision_models(), vision_name, "BLIP-2 vision encoder", folders.VISION_KEYS, precision)
        return (_load_once(("vision", path, precision), lambda: ThinkDiffVision(
            VisionEncoder.from_pretrained(path, device=mm.unet_offload_device(), dtype=PRECISIONS[precision]),
            vision_name)),)


class ThinkDiffLoadAligner:
    DESCRIPTION = ("Loads a ThinkDiff aligner (.safetensors or the official .pth) from models/thinkdiff: "
                   "thinkdiff_lvlm for ThinkDiff Reason, thinkdiff_clip for ThinkDiff Compose.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("THINKDIFF_ALIGNER",)
    RETURN_NAMES = ("aligner",)
    OUTPUT_TOOLTIPS = ("The aligner, for ThinkDiff Reason (thinkdiff_lvlm) or ThinkDiff Compose (thinkdiff_clip)",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"aligner_name": (list(folders.aligner_files()), {"tooltip":
                             "From models/thinkdiff: thinkdiff_lvlm for ThinkDiff Reason, thinkdiff_clip for "
                             "ThinkDiff Compose (.safetensors or the official .pth)"})}}

    @classmethod
    def VALIDATE_INPUTS(cls, aligner_name):
        return _validate(folders.aligner_files(), aligner_name, "aligner", [folders.ALIGNER_KEY])

    def load(self, aligner_name):
        path = _find(folders.aligner_files(), aligner_name, "aligner", [folders.ALIGNER_KEY])
        return (_load_once(("aligner", path), lambda: ThinkDiffAligner(load_aligner(path), aligner_name)),)
