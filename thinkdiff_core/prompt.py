"""The paper's chat for ThinkDiff-LVLM reasoning (CoBSAT-style in-context prompts).

The user turn is the instruction, then the in-context items in order: each word is written
"Word i: <word>, " (prefixed by two blank-line newlines unless it opens the sequence) and each
image becomes an image slot that the chat template labels "Picture i:" (add_vision_id=True).
"""

from __future__ import annotations

import os
from typing import Sequence, Union

from PIL import Image

SYSTEM_PROMPT = "You are a helpful assistant."
PAPER_INSTRUCTION = (
    "I give you several words and pictures. First, please analyse what the next picture is. "
    "Then give me a detailed diffusion prompt to describe the next picture. Please only provide "
    "me the detailed prompt and start the answer with 'Create an image'."
)
# The official instruction text ends with two newlines before the first item.
INSTRUCTION_SEPARATOR = "\n\n"

Item = Union[str, Image.Image]


def check_items(items: Sequence[Item]) -> None:
    """Raise a clear error for anything that is not a non-empty word or a PIL image."""
    if isinstance(items, (str, Image.Image)):
        raise TypeError("items must be a list of words and PIL images in order, not a single item")
    if len(items) == 0:
        raise ValueError("items is empty: give the in-context sequence (words and/or PIL images, in order)")
    for index, item in enumerate(items, start=1):
        if isinstance(item, str):
            if not item.strip():
                raise ValueError(f"item {index} is an empty word: every word must contain text")
            # A path would be read as a word; the model would never see the picture.
            if os.path.splitext(item)[1].lower() in Image.registered_extensions() and os.path.isfile(item):
                raise ValueError(f"item {index} is the path of an image file; pass the image, e.g. "
                                 f"PIL.Image.open({item!r})")
        elif not isinstance(item, Image.Image):
            raise TypeError(f"item {index} is a {type(item).__name__}; expected a str (a word) or a PIL image")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as the authors' loader (qwen-vl-utils) makes it: RGBA is composited over white."""
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image if image.mode == "RGB" else image.convert("RGB")


def interleave(words: Sequence[str], images: Sequence[Image.Image]) -> list[Item]:
    """The CoBSAT-style sequence word 1, image 1, ..., word k, image k, query word."""
    if len(words) != len(images) + 1:
        raise ValueError(
            f"{len(images)} image(s) need {len(images) + 1} words: one per image, in order, then the "
            f"query word; got {len(words)} word(s)"
        )
    items: list[Item] = []
    for word, image in zip(words, images):
        items += [word, image]
    return items + [words[-1]]


def build_messages(items: Sequence[Item], instruction: str | None = None) -> tuple[list[dict], list[Image.Image]]:
    """The chat messages (for the processor's chat template) and the images in prompt order.

    `instruction=None` uses the paper's; an empty string leaves the instruction out.
    """
    check_items(items)
    instruction = PAPER_INSTRUCTION if instruction is None else instruction
    content: list[dict] = []
    if instruction.strip():
        content.append({"type": "text", "text": instruction.rstrip("\n") + INSTRUCTION_SEPARATOR})
    images: list[Image.Image] = []
    words = 0
    for position, item in enumerate(items):
        if isinstance(item, str):
            words += 1
            separator = "" if position == 0 else "\n\n"
            content.append({"type": "text", "text": f"{separator}Word {words}: {item.strip()}, "})
        else:
            images.append(to_rgb(item))
            content.append({"type": "image"})
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": content},
    ]
    return messages, images
