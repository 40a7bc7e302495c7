"""FLUX conditioning from aligned ThinkDiff-LVLM tokens.

The aligned tokens take T5's place as FLUX's text tokens, as they are: no padding to 256/512 and
no attention mask. The pooled vector is CLIP-L's pooled output of the empty string.
"""

from __future__ import annotations

import torch


def lvlm_prompt_embeds(aligned: torch.Tensor) -> torch.Tensor:
    """[N, d] aligned tokens -> FLUX prompt_embeds [1, N, d]."""
    if aligned.dim() != 2:
        raise ValueError(f"expected aligned tokens of shape [N, d], got {tuple(aligned.shape)}")
    return aligned.unsqueeze(0)


def clip_pooled(tokenizer, text_encoder, text: str = "", device: torch.device | str | None = None) -> torch.Tensor:
    """CLIP-L's pooled output [1, width] of `text`, tokenized as FLUX pipelines do (padded to 77)."""
    ids = tokenizer([text], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(device or text_encoder.device), output_hidden_states=False).pooler_output


def flux_inputs(pipe, aligned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, pooled_prompt_embeds) for a diffusers FluxPipeline: aligned tokens + pooled CLIP-L of ""."""
    width = pipe.transformer.config.joint_attention_dim
    if aligned.shape[-1] != width:
        raise ValueError(
            f"aligned tokens are {aligned.shape[-1]}-d but this FLUX reads {width}-d T5 features; "
            f"the aligner does not belong to this FLUX model"
        )
    device, dtype = pipe._execution_device, pipe.transformer.dtype
    with torch.inference_mode():
        pooled = clip_pooled(pipe.tokenizer, pipe.text_encoder, "", device)
    return lvlm_prompt_embeds(aligned).to(device=device, dtype=dtype), pooled.to(dtype)
