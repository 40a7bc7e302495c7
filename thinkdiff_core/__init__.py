"""ThinkDiff (arXiv 2502.10458) as a framework-free library: torch + transformers + diffusers.

Steps, one module each: `prompt` (the paper's chat), `reason` (Qwen2-VL generation and the
states of its generated tokens; `decode` is its fast path), `aligner` (the trained mlp2x_gelu_t5_norm into T5 space),
`condition` (FLUX's text slot and pooled vector), `vision` + `compose` (the CLIP variant: BLIP-2
vision tokens composed with text), `render` (diffusers FLUX). transformers and diffusers are imported
only when a model is loaded.

The programs built on the method (the CLI's commands) live in `commands/`, the tiny random models of the
tests and the demo in `testing/`; nothing here imports either.
"""

from pathlib import Path

from .aligner import Aligner, CheckpointError, convert_to_safetensors, load_aligner
from .prompt import PAPER_INSTRUCTION, SYSTEM_PROMPT, build_messages
from .reason import Reasoner, Reasoning
from .vision import VisionEncoder, extract_vision

# The example images and Qwen2-VL's chat template, shipped with the package.
ASSETS = Path(__file__).parent / "assets"

__all__ = [
    "Aligner", "CheckpointError", "PAPER_INSTRUCTION", "Reasoner", "Reasoning", "SYSTEM_PROMPT",
    "VisionEncoder", "build_messages", "convert_to_safetensors", "extract_vision", "load_aligner",
]
