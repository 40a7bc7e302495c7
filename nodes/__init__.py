"""Thin ComfyUI adapters over thinkdiff_core: inputs in, core call, ComfyUI types out."""

from . import examples, folders
from .compose import ThinkDiffCompose
from .loaders import ThinkDiffLoadAligner, ThinkDiffLoadVisionEncoder, ThinkDiffLoadVLM
from .reason import ThinkDiffReason

folders.register()
examples.provide()

NODE_CLASS_MAPPINGS = {
    "ThinkDiffLoadVLM": ThinkDiffLoadVLM,
    "ThinkDiffLoadVisionEncoder": ThinkDiffLoadVisionEncoder,
    "ThinkDiffLoadAligner": ThinkDiffLoadAligner,
    "ThinkDiffReason": ThinkDiffReason,
    "ThinkDiffCompose": ThinkDiffCompose,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ThinkDiffLoadVLM": "Load ThinkDiff VLM (Qwen2-VL)",
    "ThinkDiffLoadVisionEncoder": "Load ThinkDiff Vision Encoder (BLIP-2)",
    "ThinkDiffLoadAligner": "Load ThinkDiff Aligner",
    "ThinkDiffReason": "ThinkDiff Reason (LVLM)",
    "ThinkDiffCompose": "ThinkDiff Compose (CLIP)",
}
