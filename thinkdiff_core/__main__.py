"""Command line: `python -m thinkdiff_core {demo,convert,extract-vision,make-tiny-models}`."""

from __future__ import annotations

import argparse
import json
import sys

from . import render


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m thinkdiff_core", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run the example end to end and write the image")
    demo.add_argument("--variant", choices=["lvlm", "clip"], default="lvlm",
                      help="lvlm: reason over white car, blue car, 'red'; clip: compose a cat and pink sunglasses")
    demo.add_argument("--prompt", default="", help="clip variant: text composed with the images")
    demo.add_argument("--models-dir", help="folder with FLUX.1-dev/ (diffusers layout) and, for lvlm, "
                      "Qwen2-VL-7B-Instruct/ + thinkdiff_lvlm.safetensors (or .pth); for clip, "
                      "blip2_vision.safetensors (or blip2-flan-t5-xxl/) + thinkdiff_clip.safetensors (or .pth); "
                      "default: tiny random models")
    demo.add_argument("--out", default="demo_output", help="output folder (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--steps", type=int, default=render.STEPS)
    demo.add_argument("--guidance", type=float, default=render.GUIDANCE)
    demo.add_argument("--size", type=int, help="image width and height (default: the paper's, 512 for lvlm, "
                      "1024 for clip)")
    demo.add_argument("--device", help="e.g. cuda, cuda:1, cpu (default: cuda if available)")

    convert = commands.add_parser("convert", help="keep only the aligner weights of a checkpoint, as .safetensors")
    convert.add_argument("src", help="official .pth (or .safetensors / bare state dict)")
    convert.add_argument("dst", help="output .safetensors")
    convert.add_argument("--variant", choices=["lvlm", "clip"], help="default: guessed from d_in")

    extract = commands.add_parser("extract-vision", help="write BLIP-2's vision tower as one .safetensors")
    extract.add_argument("src", help="a Salesforce/blip2-flan-t5-xxl folder")
    extract.add_argument("dst", help="output .safetensors (e.g. models/thinkdiff/blip2_vision.safetensors)")

    tiny = commands.add_parser("make-tiny-models", help="write tiny random models in the released formats")
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0)

    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run_demo

            run_demo(args.models_dir, args.out, variant=args.variant, prompt=args.prompt, seed=args.seed,
                     steps=args.steps, guidance=args.guidance, size=args.size, device=args.device)
        elif args.command == "convert":
            from .aligner import convert_to_safetensors

            print(json.dumps(convert_to_safetensors(args.src, args.dst, args.variant), indent=2))
        elif args.command == "extract-vision":
            from .vision import extract_vision

            print(json.dumps(extract_vision(args.src, args.dst), indent=2))
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
