"""convert: keep only the aligner weights of a training checkpoint, as .safetensors (aligner.convert_to_safetensors)."""

from __future__ import annotations

import argparse
import json
import sys

from ..aligner import convert_to_safetensors


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("convert", help="keep only the aligner weights of a checkpoint, as .safetensors")
    parser.add_argument("src", help="official .pth (or .safetensors / bare state dict)")
    parser.add_argument("dst", help="output .safetensors")
    parser.add_argument("--variant", choices=["lvlm", "clip"], help="(default: guessed from d_in)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    print(json.dumps(convert_to_safetensors(args.src, args.dst, args.variant), indent=2))
    print(f"aligner: {args.dst}", file=sys.stderr)  # stdout stays the JSON report alone
