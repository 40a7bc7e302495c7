"""The main jobs end to end on the shipped example images.

- `lvlm` (default): "white" + a white car, "blue" + a blue car, query "red": Qwen2-VL reasons, the
  aligner maps its generated-token states into T5 space, FLUX draws (a red car, with real models).
- `clip`: a cat and a pair of pink sunglasses (plus an optional prompt) composed into one picture
  through BLIP-2's vision tower and the CLIP-variant aligner.

Without a models folder it runs on tiny random models (built once and cached), which exercise every
step but draw noise.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .. import ASSETS
from ..files import atomic_write_text, written_aside
from ..render import GUIDANCE, STEPS, check_options
from .generate import check_params, draw

TINY_FORMAT = 3  # bump when testing/tiny_models.py writes something different, so caches are rebuilt
EXAMPLE_ITEMS = ["white", str(ASSETS / "white_car.png"), "blue", str(ASSETS / "blue_car.png"), "red"]
EXAMPLE_IMAGES = [str(ASSETS / "cat.png"), str(ASSETS / "pink_sunglasses.png")]

# Names looked for in --models-dir: the released names first, then make-tiny-models' names.
NAMES = {
    "vlm": ("Qwen2-VL-7B-Instruct", "vlm"),
    "aligner": ("thinkdiff_lvlm.safetensors", "thinkdiff_lvlm.pth", "aligner_lvlm.pth"),
    "vision": ("blip2_vision.safetensors", "blip2-flan-t5-xxl", "blip2"),
    "aligner_clip": ("thinkdiff_clip.safetensors", "thinkdiff_clip.pth", "aligner_clip.pth"),
    "flux": ("FLUX.1-dev", "flux"),
}
WHAT = {"vlm": "Qwen2-VL folder", "aligner": "ThinkDiff-LVLM aligner", "vision": "BLIP-2 vision encoder",
        "aligner_clip": "ThinkDiff-CLIP aligner", "flux": "FLUX.1 diffusers folder"}


def tiny_models_cache() -> Path:
    import transformers

    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "thinkdiff" / f"tiny-models-v{TINY_FORMAT}-transformers-{transformers.__version__}"


def ensure_tiny_models() -> Path:
    """The cached tiny models, built on first use (a marker file says the build finished)."""
    from ..testing.tiny_models import make_tiny_models

    folder = tiny_models_cache()
    if not (folder / "complete").is_file():
        make_tiny_models(folder)
        atomic_write_text(folder / "complete", "ok\n")
    return folder


def find_model(folder: Path, kind: str) -> str:
    for name in NAMES[kind]:
        if (folder / name).exists():
            return str(folder / name)
    raise FileNotFoundError(f"no {WHAT[kind]} in {folder}: looked for {', '.join(NAMES[kind])}")


def run_demo(models_dir: str | os.PathLike | None = None, out_dir: str | os.PathLike = "demo_output",
             variant: str = "lvlm", prompt: str = "", seed: int = 0, steps: int = STEPS,
             guidance: float = GUIDANCE, size: int | None = None, device: str | None = None, log=print) -> dict:
    """Run the example of `variant`; write image.png, timings.json (and answer.txt for lvlm) to `out_dir`."""
    if variant not in ("lvlm", "clip"):
        raise ValueError(f"variant must be lvlm or clip, got {variant!r}")
    if prompt and variant != "clip":
        raise ValueError("--prompt is the clip variant's text (the lvlm example reasons over its fixed words and "
                         "pictures); add --variant clip")
    check_options(steps, size, device)  # before the tiny models are built or any model loads
    if models_dir is not None and not Path(models_dir).is_dir():
        raise FileNotFoundError(f"--models-dir {models_dir}: no such folder")
    tiny = models_dir is None
    if tiny:
        log("No --models-dir: using tiny random models. Every step runs, but random weights draw noise.")
    models = ensure_tiny_models() if tiny else Path(models_dir)
    if variant == "lvlm":
        params = {"vlm": find_model(models, "vlm"), "aligner": find_model(models, "aligner"), "items": EXAMPLE_ITEMS}
    else:
        params = {"vision": find_model(models, "vision"), "aligner": find_model(models, "aligner_clip"),
                  "images": EXAMPLE_IMAGES, "prompt": prompt}
    params = check_params({**params, "variant": variant, "flux": find_model(models, "flux"), "seeds": [seed],
                           "steps": steps, "guidance": guidance, "size": size, "device": device})
    drawn, report = draw(params, log=log, progress=False)
    image, answer = drawn[seed]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with written_aside(out / "image.png") as temporary:  # each file whole (see written_aside)
        image.save(temporary, format="PNG")
    written = ["image.png", "timings.json"]
    if answer is not None:
        atomic_write_text(out / "answer.txt", answer + "\n")
        written.append("answer.txt")
    else:  # an earlier lvlm run's answer would pass for this image's
        (out / "answer.txt").unlink(missing_ok=True)
    report = {"variant": variant, "models": "tiny-random" if tiny else str(models),
              **{k: params[k] for k in ("vlm", "vision", "aligner", "flux", "prompt") if params[k] is not None},
              "seed": seed, "steps": steps, "guidance": guidance, "size": image.width, **report}
    atomic_write_text(out / "timings.json", json.dumps(report, indent=2) + "\n")
    if tiny:
        log("(Tiny random models: the image is noise" + (" and the answer gibberish" if answer else "") + " by design.)")
    # Last: where the outputs are.
    log("; ".join(f"{name.split('.')[0]}: {out / name}" for name in written))
    return report


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("demo", help="run the example end to end and write the image")
    parser.add_argument("--variant", choices=["lvlm", "clip"], default="lvlm",
                        help="lvlm: reason over white car, blue car, 'red'; clip: compose a cat and pink sunglasses")
    parser.add_argument("--prompt", default="", help="clip variant: text composed with the images")
    parser.add_argument("--models-dir", help="folder with FLUX.1-dev/ (diffusers layout) and, for lvlm, "
                        "Qwen2-VL-7B-Instruct/ + thinkdiff_lvlm.safetensors (or .pth); for clip, "
                        "blip2_vision.safetensors (or blip2-flan-t5-xxl/) + thinkdiff_clip.safetensors (or .pth) "
                        "(default: tiny random models)")
    parser.add_argument("--out", default="demo_output", help="output folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="reasoning's and FLUX's seed")
    parser.add_argument("--steps", type=int, default=STEPS, help="FLUX steps")
    parser.add_argument("--guidance", type=float, default=GUIDANCE, help="FLUX guidance")
    parser.add_argument("--size", type=int, help="image width and height (default: the paper's, 512 for lvlm, "
                        "1024 for clip)")
    parser.add_argument("--device", help="e.g. cuda, cuda:1, cpu (default: cuda if available)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    run_demo(args.models_dir, args.out, variant=args.variant, prompt=args.prompt, seed=args.seed, steps=args.steps,
             guidance=args.guidance, size=args.size, device=args.device)
