"""Command line: `python -m thinkdiff_core {demo,convert,make-tiny-models}`."""

from __future__ import annotations

import argparse
import json
import sys

from . import render


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m thinkdiff_core", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="reason over the example (white car, blue car, 'red') and draw")
    demo.add_argument("--models-dir", help="folder with Qwen2-VL-7B-Instruct/, thinkdiff_lvlm.safetensors "
                      "(or .pth) and FLUX.1-dev/ (diffusers layout); default: tiny random models")
    demo.add_argument("--out", default="demo_output", help="output folder (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--steps", type=int, default=render.STEPS)
    demo.add_argument("--guidance", type=float, default=render.GUIDANCE)
    demo.add_argument("--size", type=int, default=render.SIZE, help="image width and height")
    demo.add_argument("--device", help="e.g. cuda, cuda:1, cpu (default: cuda if available)")

    convert = commands.add_parser("convert", help="keep only the aligner weights of a checkpoint, as .safetensors")
    convert.add_argument("src", help="official .pth (or .safetensors / bare state dict)")
    convert.add_argument("dst", help="output .safetensors")
    convert.add_argument("--variant", choices=["lvlm", "clip"], help="default: guessed from d_in")

    tiny = commands.add_parser("make-tiny-models", help="write tiny random models in the released formats")
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0)

    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run_demo

            run_demo(args.models_dir, args.out, seed=args.seed, steps=args.steps, guidance=args.guidance,
                     size=args.size, device=args.device)
        elif args.command == "convert":
            from .aligner import convert_to_safetensors

            print(json.dumps(convert_to_safetensors(args.src, args.dst, args.variant), indent=2))
        else:
            from .tiny import make_tiny_models

            for name, path in make_tiny_models(args.dir, args.seed).items():
                print(f"{name}: {path}")
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
