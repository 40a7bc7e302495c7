"""ThinkDiff-CLIP composition: images (+ text) -> FLUX's T5 slot.

Each image's 65 vision tokens go through the CLIP-variant aligner; the images' tokens follow each
other in input order, then come the prompt's own T5 tokens (the authors: T5 padded to 128 tokens).
The pooled vector is CLIP-L's pooled output of the prompt.
"""

from __future__ import annotations

import torch

from .aligner import Aligner
from .vision import VisionEncoder

PAPER_T5_LENGTH = 128


def image_tokens(vision: VisionEncoder, aligner: Aligner, images) -> torch.Tensor:
    """[n_images * 65, d_out]: the aligned tokens of every image, in order."""
    if aligner.in_features != vision.hidden_size:
        raise ValueError(
            f"aligner takes {aligner.in_features}-d features but the vision encoder gives {vision.hidden_size}-d; "
            f"ThinkDiff-CLIP needs its own aligner (thinkdiff_clip.pth, d_in 1408), not the LVLM one (d_in 3584)"
        )
    with torch.inference_mode():
        aligned = aligner(vision.encode(images))
    return aligned.reshape(-1, aligned.shape[-1])


def flux_inputs(pipe, tokens: torch.Tensor, prompt: str = "",
                max_sequence_length: int = PAPER_T5_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, pooled) for a diffusers FluxPipeline: [image tokens..., T5(prompt)], CLIP-L(prompt)."""
    width = pipe.transformer.config.joint_attention_dim
    if tokens.shape[-1] != width:
        raise ValueError(f"image tokens are {tokens.shape[-1]}-d but this FLUX reads {width}-d T5 features; "
                         f"the aligner does not belong to this FLUX model")
    with torch.inference_mode():
        text, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, max_sequence_length=max_sequence_length)
    prompt_embeds = torch.cat([tokens[None].to(device=text.device, dtype=text.dtype), text], dim=1)
    return prompt_embeds, pooled
