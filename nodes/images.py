"""ComfyUI IMAGE tensors to PIL images."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def to_pil(batch: torch.Tensor, name: str) -> list[Image.Image]:
    """[B, H, W, C] floats in 0..1 (C = 1, 3 or 4) -> B PIL images, in batch order."""
    if batch.dim() == 3:
        batch = batch.unsqueeze(0)
    if batch.dim() != 4 or batch.shape[-1] not in MODES:
        raise ValueError(f"{name}: expected an IMAGE tensor [batch, height, width, 1|3|4 channels], "
                         f"got shape {tuple(batch.shape)}")
    # Rounding (not truncation) returns LoadImage's bytes exactly: it stores byte / 255.
    pixels = (batch.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    mode = MODES[batch.shape[-1]]
    return [Image.fromarray(np.squeeze(p, -1) if mode == "L" else p, mode) for p in pixels]


def collect(sockets: dict, prefix: str = "image_") -> list[tuple[str, torch.Tensor]]:
    """The connected IMAGE sockets as (name, batch), in socket order (image_1, image_2, ...)."""
    names = sorted((name for name in sockets if name.startswith(prefix) and sockets[name] is not None),
                   key=lambda name: int(name[len(prefix):]))
    if not names:
        raise ValueError("no images connected: connect image_1 (and image_2, ...)")
    return [(name, sockets[name]) for name in names]


def pictures(batches: list[tuple[str, torch.Tensor]]) -> list[Image.Image]:
    """Every image of every batch, in order: a batch counts as several images."""
    return [picture for name, batch in batches for picture in to_pil(batch, name)]
