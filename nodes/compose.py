"""ThinkDiff-CLIP: images (+ text) composed into one text conditioning, in T5-XXL's place."""

from __future__ import annotations

import math
import numbers

import torch

from ..thinkdiff_core.compose import PAPER_T5_LENGTH, image_tokens
from . import families, managed
from .images import collect, pictures
from .loaders import CATEGORY

MAX_IMAGE_INPUTS = 4
PAPER_T5, COMFYUI_T5 = f"paper ({PAPER_T5_LENGTH})", "comfyui"
T5_LENGTHS = [PAPER_T5, COMFYUI_T5]
T5_EOS, T5_PAD = 1, 0


def paper_t5_tokens(batches: list[list[tuple]], length: int = PAPER_T5_LENGTH) -> list[list[tuple]]:
    """ComfyUI's T5 tokens (padded to at least 256) as the authors fed T5: the text cut to length - 1
    tokens, its end token, then padding to exactly `length` (diffusers' max_sequence_length)."""
    def entry(token, like):
        return (token, 1.0, *([0] * (len(like) - 2)))

    result = []
    for batch in batches:
        ids = [t[0] for t in batch]
        # The closing end token is the last one: a "</s>" written in the text is tokenized as one too.
        end = len(ids) - 1 - ids[::-1].index(T5_EOS) if T5_EOS in ids else len(batch)
        text = list(batch[:min(end, length - 1)])
        closing = [entry(T5_EOS, batch[0])]
        result.append(text + closing + [entry(T5_PAD, batch[0])] * (length - len(text) - 1))
    return result


def check_attention_mask(extras: dict, text_shape: torch.Size) -> None:
    """A T5 attention mask [B, T] covers the last T text tokens (LTX-Video, Mochi); a FLUX attention bias
    covers the text-slot tokens, then the reference grid of `attention_mask_img_shape` (Apply Style
    Model's layout); anything else is refused by name."""
    mask = extras["attention_mask"]
    if mask.ndim == 2:
        if mask.shape[1] > text_shape[1] or mask.shape[0] not in (1, text_shape[0]):
            raise ValueError(f"the conditioning's attention_mask is {list(mask.shape)} but a T5 mask for its "
                             f"{text_shape[1]} tokens must be [{text_shape[0]}, at most {text_shape[1]}]")
        return
    reference = math.prod(extras.get("attention_mask_img_shape", (1, 1)))
    side = text_shape[1] + reference
    if mask.ndim != 3 or tuple(mask.shape[1:]) != (side, side) or mask.shape[0] not in (1, text_shape[0]):
        raise ValueError(f"the conditioning's attention_mask is {list(mask.shape)} but its {text_shape[1]} tokens "
                         f"and {reference} reference positions need [{text_shape[0]}, {side}, {side}]")


def extend_t5_mask(mask: torch.Tensor, n_added: int) -> torch.Tensor:
    """A T5 attention mask [B, T] with `n_added` attended tokens after it."""
    return torch.cat([mask, mask.new_ones((mask.shape[0], n_added))], dim=1)


def widen_attention_mask(mask: torch.Tensor, n_text: int, n_added: int) -> torch.Tensor:
    """Room in a FLUX attention bias for `n_added` tokens appended after the first `n_text`, as Apply
    Style Model makes it: float16, old entries kept, the new tokens' bias 0 (seen fully, as with a
    strength of 1; `strength` scales the tokens themselves)."""
    if mask.dtype == torch.bool:  # True = attend: an additive bias of 0, False of -inf
        mask = torch.zeros(mask.shape, dtype=torch.float16, device=mask.device).masked_fill(~mask, float("-inf"))
    side = mask.shape[-1] + n_added
    old = torch.cat([torch.arange(n_text), torch.arange(n_text + n_added, side)]).to(mask.device)
    widened = torch.zeros((mask.shape[0], side, side), dtype=torch.float16, device=mask.device)
    widened[:, old[:, None], old[None, :]] = mask.to(torch.float16)
    return widened


class ThinkDiffCompose:
    DESCRIPTION = ("ThinkDiff-CLIP: BLIP-2 reads each image (65 tokens), the CLIP-variant aligner maps them into T5 "
                   "space, and they are joined in order with the text's own T5 tokens, the rest laid out as the "
                   "connected CLIP's family encodes the text (FLUX.1: pooled = CLIP-L of the text; SD3/3.5: "
                   "CLIP-L/G's part first). With a conditioning input instead of text, the image tokens are appended "
                   "to it (an attention mask, e.g. Apply Style Model's attn_bias or a T5 mask, is extended for them). "
                   "The paper measured FLUX.1.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("Text conditioning for the CLIP's model: 65 tokens per image, in order, then the text's T5 "
                       "tokens (or the given conditioning, then the image tokens), the rest as that CLIP encodes the "
                       "text; use it as a CLIPTextEncode output (FLUX: into FluxGuidance)",)
    FUNCTION = "compose"

    @classmethod
    def INPUT_TYPES(cls):
        images = {f"image_{i}": ("IMAGE", {"tooltip": "An image to compose, in socket order; a batch counts as several "
                                           "images"})
                  for i in range(1, MAX_IMAGE_INPUTS + 1)}
        return {
            "required": {
                "vision": ("THINKDIFF_VISION", {"tooltip": "BLIP-2's vision tower (Load ThinkDiff Vision Encoder): "
                                               "reads each image as 65 tokens"}),
                "aligner": ("THINKDIFF_ALIGNER", {"tooltip": "The thinkdiff_clip aligner (Load ThinkDiff Aligner): "
                                                 "maps the image tokens into T5-XXL's space"}),
                "clip": ("CLIP", {"tooltip": "The image or video model's text encoders, T5-XXL among them (FLUX.1, "
                                  "SD3/3.5, Chroma, LTX-Video, Mochi, CogVideoX): encodes the text as for a prompt; "
                                  "unused when a conditioning is connected"}),
                "text": ("STRING", {"multiline": True, "default": "", "tooltip":
                         "What to do with the images, e.g. 'wearing the sunglasses on a beach'; may be empty"}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip":
                             "Multiplies the image tokens: higher weighs the images more against the text; "
                             "1.0 = the paper"}),
                "t5_length": (T5_LENGTHS, {"default": PAPER_T5, "tooltip":
                              f"paper: the text's T5 tokens cut and padded to {PAPER_T5_LENGTH} as the authors did; "
                              "comfyui: padded as ComfyUI pads the family's prompts (FLUX 256, SD3 77, LTX-Video 128)"}),
            },
            "optional": {**images, "conditioning": ("CONDITIONING", {"tooltip":
                         "Append the image tokens to this conditioning instead of encoding the text"})},
        }

    def compose(self, vision, aligner, clip, text, strength, t5_length, conditioning=None, **images):
        given = pictures(collect(images, MAX_IMAGE_INPUTS))  # bad images are refused before anything loads
        if not isinstance(text, str):
            raise ValueError(f"text must be a string (it may be empty), got a {type(text).__name__}")
        # A linked value skips the widget's range check (and NaN passes it): NaN or inf would fill every image token.
        if not (isinstance(strength, numbers.Real) and not isinstance(strength, bool) and math.isfinite(strength)):
            raise ValueError(f"strength must be a finite number (1.0 = the paper), got {strength!r}")
        if aligner.in_features != vision.hidden_size:
            raise ValueError(aligner.mismatch(vision.hidden_size, f"the vision encoder '{vision.name}'"))
        if conditioning is not None and text.strip():
            raise ValueError("give either text or a conditioning input, not both: with a conditioning the image "
                             "tokens are appended to it and the text is not encoded")
        if t5_length not in T5_LENGTHS:
            raise ValueError(f"t5_length must be one of {', '.join(T5_LENGTHS)}, got '{t5_length}'")

        appending = conditioning is not None
        if appending:
            for cond, extras in conditioning:
                if cond.shape[-1] != aligner.out_features:
                    raise ValueError(f"aligner '{aligner.name}' outputs {aligner.out_features}-d tokens but the "
                                     f"conditioning is {cond.shape[-1]}-d: it must come from a T5-XXL text encoder")
                if "attention_mask" in extras:
                    check_attention_mask(extras, cond.shape)
        else:
            families.detect(clip)
            tokens = clip.tokenize(text)
            if t5_length == PAPER_T5:
                tokens = {**tokens, "t5xxl": paper_t5_tokens(tokens["t5xxl"])}
            encoded = families.encode(clip, tokens)
            if encoded.width != aligner.out_features:
                raise ValueError(f"aligner '{aligner.name}' outputs {aligner.out_features}-d tokens but this CLIP "
                                 f"({encoded.family.name}) encodes {encoded.width}-d; ThinkDiff's aligners map into "
                                 "T5-XXL's space")

        managed.load(vision.patcher, aligner.patcher)
        composed = image_tokens(vision.encoder, aligner.module, given) * strength
        device, dtype = managed.intermediate()
        composed = composed.unsqueeze(0).to(device=device, dtype=dtype)
        if not appending:
            # The paper puts the images before the text's T5 tokens.
            mask = encoded.t5_mask
            if mask is not None:
                mask = torch.cat([mask.new_ones((1, composed.shape[1])), mask.to(composed.device)], dim=1)
            return (encoded.conditioning(torch.cat([composed, encoded.t5.to(device=device, dtype=dtype)], dim=1),
                                         mask),)
        result = []
        for cond, extras in conditioning:
            cond = cond.to(device=device, dtype=dtype)
            # Appended, as Apply Style Model does. FLUX gives all text-slot tokens the same position, so the
            # images read alike before or after the text there.
            images = composed.expand(cond.shape[0], -1, -1)
            extras = dict(extras)  # never mutate the input conditioning
            if extras.get("pooled_output") is not None:
                extras["pooled_output"] = extras["pooled_output"].to(device=device, dtype=dtype)
            mask = extras.get("attention_mask")
            if mask is not None:
                extras["attention_mask"] = (extend_t5_mask(mask, images.shape[1]) if mask.ndim == 2 else
                                            widen_attention_mask(mask, cond.shape[1], images.shape[1])).to(device)
            result.append([torch.cat([cond, images], dim=1), extras])
        return (result,)
