"""The models whose text conditioning holds T5-XXL's encoder states, told apart by the connected CLIP.

ThinkDiff's aligned tokens take T5-XXL's place. CLIPLoader's `type` (or the checkpoint) gives the CLIP a
tokenizer class per family, and each family lays its conditioning out around the T5 part in its own way:
SD3 puts CLIP-L/G's tokens before it and pools L and G, Chroma and the video models have no pooled vector,
and the video models' encoders return T5's attention mask. That layout is taken from ComfyUI's own
encoding of a text, split where T5's tokens begin, so it stays ComfyUI's as its encoders change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Family:
    name: str
    tokenizer: str  # ComfyUI's tokenizer class for it: what CLIPLoader's type decides
    load_with: str


FAMILIES = (
    Family("FLUX.1", "FluxTokenizer", "DualCLIPLoader, type flux"),
    Family("SD3 / SD3.5", "SD3Tokenizer", "TripleCLIPLoader, or the SD3.5 checkpoint's CLIP"),
    Family("Chroma / PixArt", "PixArtTokenizer", "CLIPLoader, type chroma or pixart"),
    Family("LTX-Video", "LTXVT5Tokenizer", "CLIPLoader, type ltxv"),
    Family("Mochi", "MochiT5Tokenizer", "CLIPLoader, type mochi"),
    Family("CogVideoX", "CogVideoXTokenizer", "CLIPLoader, type cogvideox, ComfyUI from May 2026"),
)
SUPPORTED = ", ".join(f"{family.name} ({family.load_with})" for family in FAMILIES)


def detect(clip) -> Family:
    """The family of this CLIP, or a ValueError naming the supported ones."""
    tokenizer = getattr(clip, "tokenizer", None)
    names = [cls.__name__ for cls in type(tokenizer).__mro__]
    for family in FAMILIES:
        if family.tokenizer in names:
            return family
    raise ValueError(f"ThinkDiff's tokens take T5-XXL's place in the text conditioning, and this CLIP ({names[0]}) "
                     f"is not one whose layout this pack knows; connect the text encoders of one of: {SUPPORTED}")


@dataclass
class TextEncoding:
    """ComfyUI's encoding of one text, split where T5-XXL's tokens begin."""

    family: Family
    before_t5: torch.Tensor  # [1, P, d]: SD3's CLIP-L/G tokens; P = 0 in the other families
    t5: torch.Tensor  # [1, T, d]
    pooled: torch.Tensor | None  # None where the family has no pooled vector
    t5_mask: torch.Tensor | None  # [1, T]: where the family's encoder returns T5's attention mask
    extras: dict = field(default_factory=dict)  # anything else ComfyUI put beside them (hooks), kept

    @property
    def width(self) -> int:
        return self.t5.shape[-1]

    def conditioning(self, t5_slot: torch.Tensor, t5_slot_mask: torch.Tensor | None = None) -> list:
        """ComfyUI conditioning with `t5_slot` [rows, n, d] in T5's place, on its device and dtype; a family
        with a T5 mask gets `t5_slot_mask` [rows, n] (default: every token attended)."""
        rows, length = t5_slot.shape[:2]
        like = {"device": t5_slot.device, "dtype": t5_slot.dtype}
        cond = torch.cat([self.before_t5.to(**like).expand(rows, -1, -1), t5_slot], dim=1)
        extras = dict(self.extras)
        extras["pooled_output"] = None if self.pooled is None else self.pooled.to(**like).expand(rows, -1).clone()
        if self.t5_mask is not None:
            if t5_slot_mask is None:
                t5_slot_mask = torch.ones((rows, length), dtype=self.t5_mask.dtype)
            extras["attention_mask"] = t5_slot_mask.to(device=t5_slot.device, dtype=self.t5_mask.dtype)
        return [[cond, extras]]


def encode(clip, tokens: dict) -> TextEncoding:
    """Encode `tokens` (from clip.tokenize, T5's part possibly re-padded) as ComfyUI does, split at T5."""
    family = detect(clip)
    encoded = dict(clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True))
    cond, pooled = encoded.pop("cond"), encoded.pop("pooled_output", None)
    mask = encoded.pop("attention_mask", None)
    # SD3's CLIP may be loaded without T5 (its conditioning then holds CLIP-L/G's part only).
    t5_loaded = getattr(clip.cond_stage_model, "t5xxl", None) is not None
    t5_count = sum(len(batch) for batch in tokens["t5xxl"]) if t5_loaded else 0
    if cond.shape[0] != 1 or not 0 <= t5_count <= cond.shape[1]:
        raise ValueError(f"{family.name}'s CLIP encoded {t5_count} T5 tokens as a conditioning of shape "
                         f"{list(cond.shape)}; expected one row holding them at its end")
    split = cond.shape[1] - t5_count
    return TextEncoding(family, cond[:, :split], cond[:, split:], pooled, mask, encoded)
