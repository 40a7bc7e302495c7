"""ThinkDiff without ComfyUI: run the example (demo), generate images, evaluate on CoBSAT, measure reasoning
speed (bench), prepare data for and train aligners, convert aligner checkpoints, extract BLIP-2's vision tower
and write tiny random models. Each command has its own --help."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import render
from .bench import PATHS


def read_config(path: str) -> dict:
    """The parameters of a run.json given to --config."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--config {path}: file not found (expected the run.json of an earlier run)")
    try:
        params = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--config {path}: not a run.json (not JSON: {e})") from e
    if not isinstance(params, dict):
        raise ValueError(f"--config {path}: not a run.json (expected a JSON object of parameters)")
    return params


def main(argv: list[str] | None = None) -> int:
    # As the user typed it: the `thinkdiff` command of `pip install .`, or the module.
    prog = "thinkdiff" if Path(sys.argv[0]).stem == "thinkdiff" else "python -m thinkdiff_core"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
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

    gen = commands.add_parser("generate", help="draw with ThinkDiff through diffusers (several seeds, reproducible)")
    gen.add_argument("--config", help="a run.json of an earlier run: run it again (other options override it)")
    gen.add_argument("--variant", choices=["lvlm", "clip"])
    gen.add_argument("--vlm", help="lvlm: Qwen2-VL folder")
    gen.add_argument("--aligner", help="the variant's aligner (.safetensors or .pth)")
    gen.add_argument("--vision", help="clip: BLIP-2 vision file or folder")
    gen.add_argument("--flux", help="FLUX.1 diffusers folder")
    gen.add_argument("--items", nargs="+", help="lvlm: words and image paths in order, e.g. white a.jpg blue b.jpg red")
    gen.add_argument("--images", nargs="+", help="clip: images to compose, in order")
    gen.add_argument("--prompt", help="clip: text composed with the images")
    gen.add_argument("--instruction", help="lvlm: replaces the paper's instruction")
    gen.add_argument("--seeds", nargs="+", type=int, help="one image per seed (default: 0)")
    gen.add_argument("--steps", type=int)
    gen.add_argument("--guidance", type=float)
    gen.add_argument("--size", type=int, help="default: 512 for lvlm, 1024 for clip")
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--top-p", dest="top_p", type=float)
    gen.add_argument("--max-new-tokens", dest="max_new_tokens", type=int)
    gen.add_argument("--device")
    gen.add_argument("--quantize", choices=["8bit", "4bit"], help="lvlm: load Qwen2-VL quantised (bitsandbytes) "
                     "for GPUs of 24 GB or less; its states drift from the bf16 ones the aligner was trained on")
    gen.add_argument("--out", default="generate_output", help="output folder (default: %(default)s)")

    bench = commands.add_parser("cobsat", help="evaluate ThinkDiff-LVLM on CoBSAT (resumable)")
    bench.add_argument("--data", required=True, help="CoBSAT checkout (datasets/, load_datasets/)")
    bench.add_argument("--shots", type=int, default=2)
    bench.add_argument("--tasks", default="all", help="all, or e.g. 1,2 or Color-I,Style-II")
    bench.add_argument("--limit", type=int, help="the first N prompts of each task (default: all 1000)")
    bench.add_argument("--vlm", required=True, help="Qwen2-VL folder")
    bench.add_argument("--aligner", required=True, help="ThinkDiff-LVLM aligner")
    bench.add_argument("--flux", required=True, help="FLUX.1 diffusers folder")
    bench.add_argument("--judge", help="judge VLM folder (default: --vlm)")
    bench.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i")
    bench.add_argument("--steps", type=int, default=render.STEPS)
    bench.add_argument("--guidance", type=float, default=render.GUIDANCE)
    bench.add_argument("--size", type=int, default=render.SIZE["lvlm"])
    bench.add_argument("--out", default="cobsat_output", help="output folder (default: %(default)s)")

    speed = commands.add_parser("bench", help="reasoning latency and memory: transformers' generate against the "
                                "fast path (default: Qwen2-VL-7B's architecture with random weights)")
    speed.add_argument("--vlm", help="a Qwen2-VL folder to load instead of random weights")
    speed.add_argument("--config", help="random weights with this config.json instead of Qwen2-VL-7B's")
    speed.add_argument("--device", help="default: cuda if available")
    speed.add_argument("--tokens", type=int, default=128)
    speed.add_argument("--repeats", type=int, default=3, help="warm runs per path (the median is reported)")
    speed.add_argument("--seed", type=int, default=0)
    speed.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    speed.add_argument("--prompt-tokens", type=int, default=612, help="random weights: prompt length")
    speed.add_argument("--image-size", type=int, default=448, help="random weights: side of the two images")
    speed.add_argument("--leak-runs", type=int, default=10, help="fast path runs of the leak check (0: none)")
    speed.add_argument("--quantize", nargs="+", default=[], choices=["8bit", "4bit"],
                       help="also load quantised (needs bitsandbytes) and measure the drift of its states")
    speed.add_argument("--save-random", help="save the random model here (safetensors) to measure loading "
                       "and quantisation")
    speed.add_argument("--drop-page-cache", action="store_true", help="before each load, drop Linux's page "
                       "cache (root only) so that loading reads the disk")
    speed.add_argument("--out", help="also write the JSON here (rewritten after each stage)")

    prepare = commands.add_parser("prepare-lvlm", help="precompute Qwen2-VL answers and states for aligner training")
    prepare.add_argument("--vlm", required=True, help="Qwen2-VL folder")
    prepare.add_argument("--data", required=True, help="a folder of images (+ .txt captions) or WebDataset .tar shards")
    prepare.add_argument("--out", required=True)
    prepare.add_argument("--max-new-tokens", type=int, default=256)
    prepare.add_argument("--shard-size", type=int, default=256)
    prepare.add_argument("--limit", type=int, help="only the first N samples")
    prepare.add_argument("--seed", type=int, default=0)

    trainer = commands.add_parser("train", help="train an aligner (the paper's recipe; `accelerate launch` for DDP)")
    trainer.add_argument("--variant", choices=["lvlm", "clip"], required=True)
    trainer.add_argument("--t5", required=True, help="Flan-T5 folder (google/flan-t5-xxl): its decoder stays frozen")
    trainer.add_argument("--data", required=True, help="lvlm: a prepare-lvlm folder; clip: images + .txt captions "
                         "or .tar shards")
    trainer.add_argument("--vision", help="clip: BLIP-2 vision file or folder")
    trainer.add_argument("--out", required=True)
    trainer.add_argument("--steps", type=int, default=200_000, help="default: the paper's 40 epochs x 5000 steps")
    trainer.add_argument("--batch-size", type=int, help="per process; default 32 (lvlm), 42 (clip)")
    trainer.add_argument("--lr", type=float, default=1e-4)
    trainer.add_argument("--min-lr", type=float, default=8e-5)
    trainer.add_argument("--warmup-lr", type=float, default=1e-6)
    trainer.add_argument("--warmup-steps", type=int, default=2000)
    trainer.add_argument("--weight-decay", type=float, default=0.05)
    trainer.add_argument("--max-text-tokens", type=int, help="T5 target length; default 128 (lvlm), 32 (clip)")
    trainer.add_argument("--val-fraction", type=float, default=0.0,
                         help="share of samples held out for validation; default 0 (the authors hold none out)")
    trainer.add_argument("--val-every", type=int, default=1000)
    trainer.add_argument("--save-every", type=int, default=5000)
    trainer.add_argument("--log-every", type=int, default=10)
    trainer.add_argument("--seed", type=int, default=42)
    trainer.add_argument("--precision", choices=["bf16", "fp32"], help="default: bf16 on GPU, fp32 on CPU")
    trainer.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is there")
    trainer.add_argument("--resume", action="store_true", help="continue from --out's last checkpoint")

    convert = commands.add_parser("convert", help="keep only the aligner weights of a checkpoint, as .safetensors")
    convert.add_argument("src", help="official .pth (or .safetensors / bare state dict)")
    convert.add_argument("dst", help="output .safetensors")
    convert.add_argument("--variant", choices=["lvlm", "clip"], help="default: guessed from d_in")

    extract = commands.add_parser("extract-vision", help="write BLIP-2's vision tower as one .safetensors")
    extract.add_argument("src", help="a Salesforce/blip2-flan-t5-xxl folder")
    extract.add_argument("dst", help="output .safetensors (e.g. models/thinkdiff/blip2_vision.safetensors)")

    tiny = commands.add_parser(
        "make-tiny-models", help="write tiny random models in the released formats",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write tiny random models (seconds on a CPU) in the released on-disk formats, for tests and for\n"
                    "trying every command without downloads; they draw noise. DIR then holds:\n"
                    "  vlm/              Qwen2-VL folder (Hugging Face layout)\n"
                    "  blip2/            BLIP-2 folder (Salesforce/blip2-flan-t5-xxl layout)\n"
                    "  flux/             FLUX.1 diffusers folder\n"
                    "  flan-t5/          Flan-T5 folder (for train)\n"
                    "  aligner_lvlm.pth  ThinkDiff-LVLM aligner (official checkpoint layout)\n"
                    "  aligner_clip.pth  ThinkDiff-CLIP aligner\n"
                    "demo --models-dir DIR runs on them. Existing vlm/, blip2/, flux/ and flan-t5/ there are replaced.")
    tiny.add_argument("dir", metavar="DIR", help="folder to write into (created if missing)")
    tiny.add_argument("--seed", type=int, default=0)

    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run_demo

            run_demo(args.models_dir, args.out, variant=args.variant, prompt=args.prompt, seed=args.seed,
                     steps=args.steps, guidance=args.guidance, size=args.size, device=args.device)
        elif args.command == "generate":
            from .generate import OTHER_VARIANT_OPTIONS, generate

            params = read_config(args.config) if args.config else {}
            options = {k: v for k, v in vars(args).items() if k not in ("command", "config", "out") and v is not None}
            # A run.json may hold options its variant never used (older versions recorded them, or --variant
            # switches): they are not asked for now, so they are dropped rather than refused.
            variant = options.get("variant", params.get("variant", "lvlm"))
            params = {k: v for k, v in params.items() if k not in OTHER_VARIANT_OPTIONS.get(variant, ())}
            generate({**params, **options}, args.out)
        elif args.command == "cobsat":
            from .cobsat import run_cobsat

            run_cobsat(args.data, args.out, args.vlm, args.aligner, args.flux, args.judge or args.vlm, shot=args.shots,
                       tasks=args.tasks, limit=args.limit, seed=args.seed, steps=args.steps, guidance=args.guidance,
                       size=args.size)
        elif args.command == "bench":
            from .bench import run_bench

            results = run_bench(args.vlm, args.device, args.tokens, args.repeats, args.seed, args.paths, args.quantize,
                                args.save_random, args.config, args.prompt_tokens, args.image_size, args.leak_runs,
                                args.out, args.drop_page_cache, log=lambda line: print(line, file=sys.stderr))
            print(json.dumps(results, indent=2))
        elif args.command == "prepare-lvlm":
            from .train import prepare_lvlm

            count = prepare_lvlm(args.vlm, args.data, args.out, max_new_tokens=args.max_new_tokens, seed=args.seed,
                                 shard_size=args.shard_size, limit=args.limit)
            print(f"prepared {count} new samples in {args.out}")
        elif args.command == "train":
            from .train import train

            options = {k: v for k, v in vars(args).items() if k not in ("command", "variant", "t5", "data", "out")}
            options["cpu"] = True if options["cpu"] else None
            train(args.variant, args.t5, args.data, args.out, **options)
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
    # ImportError: an optional dependency an option needs (bitsandbytes for --quantize).
    except (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
