"""prepare-lvlm: precompute Qwen2-VL's answers and states over image data for ThinkDiff-LVLM's aligner training
(THINKDIFF.md, "Training the aligner").

Qwen2-VL answers one of the authors' brief instructions about each image; the final-norm states of its
generated tokens (bf16), their ids and the text are stored in safetensors shards, with the VLM's tokenizer
beside them so that training never loads the VLM. Resumable: samples already in the shards are skipped.
Each shard is written aside and renamed into place (as the tokenizer folder), so a kill leaves only whole
shards; Ctrl-C writes the samples generated so far as a last shard before stopping.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
from pathlib import Path

import torch

from .training_data import image_caption_samples, prepared_keys

BRIEF_INSTRUCTIONS = [  # the authors' instructions for the precomputed answers (LLaVA's brief ones + theirs)
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
    "Generate a prompt that can recreate the image in a 2D diffusion model.",
    "Provide a descriptive prompt to reproduce the given image using a diffusion model.",
    "Create a prompt suitable for a 2D diffusion model to generate the same image.",
    "Summarize the visual details as a prompt for a 2D diffusion model.",
    "Write a clear prompt to guide a 2D diffusion model in recreating the image.",
]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.json")


def prepare_lvlm(vlm, data, out, max_new_tokens: int = 256, seed: int = 0, shard_size: int = 256,
                 limit: int | None = None, log=print) -> int:
    """Precompute the VLM's answers and states over image data; resumable (done keys are skipped)."""
    from ..files import save_safetensors
    from ..prompt import SYSTEM_PROMPT, to_rgb
    from ..reason import Reasoner

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    done = prepared_keys(out)
    reasoner = None
    # key -> (states, ids, text record): one assignment per sample, so that Ctrl-C never leaves part of one.
    pending: dict[str, tuple[torch.Tensor, torch.Tensor, dict]] = {}
    # After the highest number: a gap (a damaged shard deleted, as its error says) never leads to overwriting one.
    shard_number = 1 + max((int(path.stem[len("shard-"):]) for path in out.glob("shard-*.safetensors")
                            if path.stem[len("shard-"):].isdigit()), default=-1)
    written = 0

    def flush():
        nonlocal shard_number, written
        if pending:
            tensors = {f"{key}.{name}": tensor for key, (states, ids, _) in pending.items()
                       for name, tensor in (("states", states), ("ids", ids))}
            save_safetensors(tensors, out / f"shard-{shard_number:06d}.safetensors",
                             metadata={"texts": json.dumps({key: text for key, (_, _, text) in pending.items()})})
            shard_number += 1
            written += len(pending)
            pending.clear()

    try:
        for index, (key, image, _caption) in enumerate(image_caption_samples(data)):
            if limit is not None and index >= limit:
                break
            if key in done:
                continue
            if reasoner is None:
                reasoner = Reasoner.from_pretrained(vlm) if isinstance(vlm, (str, os.PathLike)) else vlm
                tokenizer_dir = out / "tokenizer"
                if isinstance(vlm, (str, os.PathLike)) and not tokenizer_dir.exists():
                    partial = out / ".tokenizer.partial"  # copied aside, renamed into place: whole or absent
                    shutil.rmtree(partial, ignore_errors=True)
                    partial.mkdir()
                    for name in TOKENIZER_FILES:
                        if (Path(vlm) / name).is_file():
                            shutil.copy(Path(vlm) / name, partial / name)
                    partial.rename(tokenizer_dir)
            instruction = BRIEF_INSTRUCTIONS[random.Random(f"{seed}/{key}").randrange(len(BRIEF_INSTRUCTIONS))]
            messages = [{"role": "system", "content": SYSTEM_PROMPT},
                        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
            prompt = reasoner.processor.tokenizer.apply_chat_template(
                messages, chat_template=getattr(reasoner.processor, "chat_template", None), tokenize=False,
                add_generation_prompt=True)
            result = reasoner.generate(prompt, [to_rgb(image)], seed=seed + index, max_new_tokens=max_new_tokens,
                                       min_new_tokens=1)
            pending[key] = (result.hidden_states.to(torch.bfloat16).contiguous(), result.token_ids.contiguous(),
                            {"text": result.text, "instruction": instruction})
            log(f"[prepare] {key}: {len(result.token_ids)} tokens")
            if len(pending) >= shard_size:
                flush()
        flush()
    except KeyboardInterrupt:
        flush()  # the samples generated so far are whole: kept, not generated again
        raise KeyboardInterrupt(f"interrupted; {written} new samples are kept in {out} ({len(done) + written} in "
                                f"all); run the same command again to resume") from None
    return written


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("prepare-lvlm", help="precompute Qwen2-VL answers and states for aligner training")
    parser.add_argument("--vlm", required=True, help="Qwen2-VL folder")
    parser.add_argument("--data", required=True, help="a folder of images (+ .txt captions) or WebDataset .tar shards")
    parser.add_argument("--out", required=True, help="folder of the shards (train's --data)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="most tokens of each answer")
    parser.add_argument("--shard-size", type=int, default=256, help="samples per safetensors shard")
    parser.add_argument("--limit", type=int, help="only the first N samples (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="instruction choice and sampling (sample i: seed + i)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    count = prepare_lvlm(args.vlm, args.data, args.out, max_new_tokens=args.max_new_tokens, seed=args.seed,
                         shard_size=args.shard_size, limit=args.limit)
    print(f"prepared {count} new samples; shards: {args.out}")
