"""Thin ComfyUI adapters over thinkdiff_core: inputs in, core call, ComfyUI types out."""

from . import folders
from .lvlm import ThinkDiffLoadAligner, ThinkDiffLoadVLM, ThinkDiffReason

folders.register()

NODE_CLASS_MAPPINGS = {
    "ThinkDiffLoadVLM": ThinkDiffLoadVLM,
    "ThinkDiffLoadAligner": ThinkDiffLoadAligner,
    "ThinkDiffReason": ThinkDiffReason,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ThinkDiffLoadVLM": "Load ThinkDiff VLM (Qwen2-VL)",
    "ThinkDiffLoadAligner": "Load ThinkDiff Aligner",
    "ThinkDiffReason": "ThinkDiff Reason (FLUX conditioning)",
}
