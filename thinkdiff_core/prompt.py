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
MAX_ASPECT_RATIO = 200  # Qwen2-VL's image processor refuses longer, thinner images


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
        elif max(item.size) > MAX_ASPECT_RATIO * min(item.size):  # a 0-pixel side included
            raise ValueError(f"item {index} is a {item.width}x{item.height} image; Qwen2-VL takes images whose "
                             f"longer side is at most {MAX_ASPECT_RATIO} times the shorter")


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
    if instruction is not None and not isinstance(instruction, str):
        raise TypeError(f"instruction is a {type(instruction).__name__}; expected a str (or None for the paper's)")
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


def special_tokens(tokenizer) -> dict[int, str]:
    """The tokenizer's special tokens by id, read from the tokenizer itself: its named ones and every added token
    marked special (for Qwen2-VL the chat-turn, vision and grounding markers; any other tokenizer's own)."""
    tokens = set(tokenizer.all_special_tokens)
    tokens.update(added.content for added in getattr(tokenizer, "added_tokens_decoder", {}).values() if added.special)
    return {tokenizer.convert_tokens_to_ids(token): token for token in tokens}


def _special_sequence(tokenizer, text: str, specials: dict[int, str]) -> list[str]:
    return [specials[i] for i in tokenizer(text, add_special_tokens=False)["input_ids"] if i in specials]


PLAIN_TEXT = "words and the instruction are plain text: they cannot open chat turns or add image slots"


def check_plain_text(tokenizer, items: Sequence[Item], instruction: str | None = None) -> None:
    """Refuse a word or an instruction that holds one of the tokenizer's special tokens, written out or formed
    by the tokenizer's normalisation (an added token may be matched after it)."""
    specials = special_tokens(tokenizer)
    texts = [("the instruction", instruction)] if instruction else []
    words = [item for item in items if isinstance(item, str)]
    texts += [(f"word {n} ({word.strip()!r})", word) for n, word in enumerate(words, start=1)]
    for name, text in texts:
        written = [token for token in specials.values() if token in text]
        if written:
            raise ValueError(f"{name} contains {min(written, key=text.find)!r}, a special token of the VLM's "
                             f"tokenizer: remove it ({PLAIN_TEXT})")
        formed = _special_sequence(tokenizer, text, specials)
        if formed:
            raise ValueError(f"{name} forms {formed[0]!r}, a special token of the VLM's tokenizer, once the tokenizer "
                             f"normalises it: remove it ({PLAIN_TEXT})")


def placeholder(items: Sequence[Item], instruction: str | None = None) -> tuple[list[Item], str | None]:
    """The same sequence (words, images, instruction or none) with harmless text, for `check_structure`."""
    blank = Image.new("RGB", (1, 1))  # only the image's slot is rendered, never its pixels
    shape = ["x" if isinstance(item, str) else blank for item in items]
    return shape, (instruction if instruction is None else "x" if instruction.strip() else "")


def check_structure(tokenizer, prompt: str, reference: str) -> None:
    """The rendered chat's special tokens must be exactly those of `reference`, the same chat rendered from
    `placeholder` text: nothing the inputs hold, alone or where they meet the chat's own text, adds any."""
    specials = special_tokens(tokenizer)
    got, expected = _special_sequence(tokenizer, prompt, specials), _special_sequence(tokenizer, reference, specials)
    if got != expected:
        changed = sorted(token for token in {*got, *expected} if got.count(token) != expected.count(token))
        changed = ", ".join(map(repr, changed)) or "their order"
        raise ValueError(f"the words or the instruction change the chat's special tokens ({changed}) where they meet "
                         f"the chat's own text: change them ({PLAIN_TEXT})")
