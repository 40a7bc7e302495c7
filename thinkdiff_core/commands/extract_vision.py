"""extract-vision: write BLIP-2's vision tower as one .safetensors (vision.extract_vision)."""

from __future__ import annotations

import argparse
import json
import sys

from ..vision import extract_vision


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("extract-vision", help="write BLIP-2's vision tower as one .safetensors")
    parser.add_argument("src", help="a Salesforce/blip2-flan-t5-xxl folder")
    parser.add_argument("dst", help="output .safetensors (e.g. ../../models/thinkdiff/blip2_vision.safetensors from "
                        "the pack's folder)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    print(json.dumps(extract_vision(args.src, args.dst), indent=2))
    print(f"vision: {args.dst}", file=sys.stderr)  # stdout stays the JSON report alone
