"""make-tiny-models: write the tiny random models of `thinkdiff_core.testing.tiny_models` into a folder."""

from __future__ import annotations

import argparse

from ..testing.tiny_models import make_tiny_models
from . import RawDescriptionDefaultsFormatter


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "make-tiny-models", help="write tiny random models in the released formats",
        formatter_class=RawDescriptionDefaultsFormatter,
        description="Write tiny random models (seconds on a CPU) in the released on-disk formats, for tests and for\n"
                    "trying every command without downloads; they draw noise. DIR then holds:\n"
                    "  vlm/              Qwen2-VL folder (Hugging Face layout)\n"
                    "  blip2/            BLIP-2 folder (Salesforce/blip2-flan-t5-xxl layout)\n"
                    "  flux/             FLUX.1 diffusers folder\n"
                    "  flan-t5/          Flan-T5 folder (for train)\n"
                    "  aligner_lvlm.pth  ThinkDiff-LVLM aligner (official checkpoint layout)\n"
                    "  aligner_clip.pth  ThinkDiff-CLIP aligner\n"
                    "demo --models-dir DIR runs on them. Existing vlm/, blip2/, flux/ and flan-t5/ there are replaced.")
    parser.add_argument("dir", metavar="DIR", help="folder to write into (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="the random weights' seed")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    for name, path in make_tiny_models(args.dir, args.seed).items():
        print(f"{name}: {path}")
    print(f"models: {args.dir} (demo --models-dir {args.dir} runs on them)")
