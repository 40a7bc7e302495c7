"""ComfyUI IMAGE tensors to PIL images."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def to_pil(batch: torch.Tensor, name: str) -> list[Image.Image]:
    """[B, H, W, C] floats in 0..1 (C = 1, 3 or 4) -> B PIL images, in batch order."""
    expected = "an IMAGE: a torch tensor [batch, height, width, 1|3|4 channels] of floats in 0..1"
    if not isinstance(batch, torch.Tensor):
        raise ValueError(f"{name}: expected {expected}, got a {type(batch).__module__}.{type(batch).__name__}")
    if batch.dim() == 3:
        batch = batch.unsqueeze(0)
    if batch.dim() != 4 or batch.shape[-1] not in MODES:
        raise ValueError(f"{name}: expected {expected}, got shape {tuple(batch.shape)}")
    if 0 in batch.shape[:3]:
        raise ValueError(f"{name}: expected at least one image of at least 1x1 pixels, got shape {tuple(batch.shape)}")
    if not batch.is_floating_point():
        raise ValueError(f"{name}: expected {expected}, got {batch.dtype} values")
    # NaN would become an arbitrary byte; ComfyUI's own images are always finite.
    if not torch.isfinite(batch).all():
        raise ValueError(f"{name}: expected {expected}, got NaN or infinite pixel values")
    # Rounding (not truncation) returns LoadImage's bytes exactly: it stores byte / 255.
    pixels = (batch.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    mode = MODES[batch.shape[-1]]
    return [Image.fromarray(np.squeeze(p, -1) if mode == "L" else p, mode) for p in pixels]


def collect(sockets: dict, count: int, prefix: str = "image_") -> list[tuple[str, torch.Tensor]]:
    """The connected IMAGE sockets as (name, batch), in socket order (image_1, image_2, ...); any other input
    name (a prompt sent over HTTP may hold any) is refused."""
    names = [f"{prefix}{i}" for i in range(1, count + 1)]
    unknown = [name for name in sockets if name not in names]
    if unknown:
        raise ValueError(f"unknown input '{unknown[0]}': this node's image inputs are {names[0]} ... {names[-1]}")
    connected = [name for name in names if sockets.get(name) is not None]
    if not connected:
        raise ValueError(f"no images connected: connect {names[0]} (and {names[1]}, ...)")
    return [(name, sockets[name]) for name in connected]


def pictures(batches: list[tuple[str, torch.Tensor]]) -> list[Image.Image]:
    """Every image of every batch, in order: a batch counts as several images."""
    return [picture for name, batch in batches for picture in to_pil(batch, name)]
