"""The main jobs end to end on the shipped example images.

- `lvlm` (default): "white" + a white car, "blue" + a blue car, query "red": Qwen2-VL reasons, the
  aligner maps its generated-token states into T5 space, FLUX draws (a red car, with real models).
- `clip`: a cat and a pair of pink sunglasses (plus an optional prompt) composed into one picture
  through BLIP-2's vision tower and the CLIP-variant aligner.

Without a models folder it runs on tiny random models (built once and cached), which exercise every
step but draw noise.
"""

from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path

import torch
from PIL import Image

from . import compose, condition
from .aligner import load_aligner
from .reason import Reasoner
from .render import GUIDANCE, SIZE, STEPS, load_flux, render
from .vision import VisionEncoder

ASSETS = Path(__file__).parent / "assets"
TINY_FORMAT = 2  # bump when tiny.py writes something different, so caches are rebuilt

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


def example_items() -> list:
    return ["white", Image.open(ASSETS / "white_car.png"), "blue", Image.open(ASSETS / "blue_car.png"), "red"]


def example_composition() -> list:
    return [Image.open(ASSETS / "cat.png"), Image.open(ASSETS / "pink_sunglasses.png")]


def tiny_models_cache() -> Path:
    import transformers

    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "thinkdiff" / f"tiny-models-v{TINY_FORMAT}-transformers-{transformers.__version__}"


def ensure_tiny_models() -> Path:
    """The cached tiny models, built on first use (a marker file says the build finished)."""
    from .tiny import make_tiny_models

    folder = tiny_models_cache()
    if not (folder / "complete").is_file():
        make_tiny_models(folder)
        (folder / "complete").write_text("ok\n")
    return folder


def find_model(folder: Path, kind: str) -> Path:
    for name in NAMES[kind]:
        if (folder / name).exists():
            return folder / name
    raise FileNotFoundError(f"no {WHAT[kind]} in {folder}: looked for {', '.join(NAMES[kind])}")


def _free_cuda():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_demo(models_dir: str | os.PathLike | None = None, out_dir: str | os.PathLike = "demo_output",
             variant: str = "lvlm", prompt: str = "", seed: int = 0, steps: int = STEPS,
             guidance: float = GUIDANCE, size: int | None = None, device: str | None = None, log=print) -> dict:
    """Run the example of `variant` and write image.png, timings.json (and answer.txt for lvlm) to `out_dir`."""
    if variant not in SIZE:
        raise ValueError(f"variant must be one of {', '.join(SIZE)}, got {variant!r}")
    started = time.perf_counter()
    tiny = models_dir is None
    if tiny:
        log("No --models-dir: using tiny random models. Every step runs, but random weights draw noise.")
    models = ensure_tiny_models() if tiny else Path(models_dir)
    kinds = ("vlm", "aligner", "flux") if variant == "lvlm" else ("vision", "aligner_clip", "flux")
    paths = {kind: find_model(models, kind) for kind in kinds}
    size = size or SIZE[variant]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}

    def timed(name, fn):
        t = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        timings[name] = round(time.perf_counter() - t, 3)
        return result

    report = {"variant": variant, "models": "tiny-random" if tiny else str(models),
              **{kind: str(path) for kind, path in paths.items()}}
    if variant == "lvlm":
        reasoner = timed("load_vlm_s", lambda: Reasoner.from_pretrained(paths["vlm"], device=device))
        aligner = timed("load_aligner_s", lambda: load_aligner(paths["aligner"], device=reasoner.device))
        if aligner.in_features != reasoner.hidden_size:
            raise ValueError(f"aligner {paths['aligner']} takes {aligner.in_features}-d states but the VLM "
                             f"{paths['vlm']} has hidden size {reasoner.hidden_size}")
        reasoning = timed("reason_s", lambda: reasoner.reason(example_items(), seed=seed))
        tokens = timed("align_s", lambda: aligner(reasoning.hidden_states)).float()
        timings["reason_tokens_per_s"] = round(len(reasoning.token_ids) / timings["reason_s"], 2)
        report["generated_tokens"] = len(reasoning.token_ids)
        (out / "answer.txt").write_text(reasoning.text + "\n")
        log(f"VLM answer: {reasoning.text}")
        del reasoner  # the VLM leaves memory before FLUX arrives
    else:
        vision = timed("load_vision_s", lambda: VisionEncoder.from_pretrained(paths["vision"], device=device))
        aligner = timed("load_aligner_s", lambda: load_aligner(paths["aligner_clip"], device=vision.device))
        tokens = timed("encode_s", lambda: compose.image_tokens(vision, aligner, example_composition())).float()
        report["prompt"] = prompt
        del vision
    _free_cuda()
    pipe = timed("load_flux_s", lambda: load_flux(paths["flux"], device=device))
    inputs = condition.flux_inputs(pipe, tokens) if variant == "lvlm" else compose.flux_inputs(pipe, tokens, prompt)
    image = timed("render_s", lambda: render(pipe, *inputs, seed=seed, steps=steps, guidance=guidance,
                                             height=size, width=size))
    timings["total_s"] = round(time.perf_counter() - started, 3)

    image.save(out / "image.png")
    report.update({"device": str(pipe._execution_device),
                   "seed": seed, "steps": steps, "guidance": guidance, "size": size,
                   "conditioning_tokens": inputs[0].shape[1], "timings": timings})
    (out / "timings.json").write_text(json.dumps(report, indent=2) + "\n")
    written = ["image.png", "timings.json"] + (["answer.txt"] if variant == "lvlm" else [])
    log(f"Wrote {', '.join(str(out / name) for name in written)}")
    if tiny:
        log("(Tiny random models: the image is noise" + (" and the answer gibberish" if variant == "lvlm" else "")
            + " by design.)")
    return report
