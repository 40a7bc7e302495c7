"""The main job end to end: 2-shot reasoning -> aligner -> FLUX, on the shipped example images.

"white" + a white car, "blue" + a blue car, query "red": ThinkDiff should draw a red car.
Without a models folder it runs on tiny random models (built once and cached), which exercise
every step but draw noise.
"""

from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path

import torch
from PIL import Image

from .aligner import load_aligner
from .reason import Reasoner
from .render import GUIDANCE, SIZE, STEPS, load_flux, render

ASSETS = Path(__file__).parent / "assets"
TINY_FORMAT = 1  # bump when tiny.py writes something different, so caches are rebuilt

# Names looked for in --models-dir: the released names first, then make-tiny-models' names.
VLM_NAMES = ("Qwen2-VL-7B-Instruct", "vlm")
ALIGNER_NAMES = ("thinkdiff_lvlm.safetensors", "thinkdiff_lvlm.pth", "aligner_lvlm.pth")
FLUX_NAMES = ("FLUX.1-dev", "flux")


def example_items() -> list:
    return ["white", Image.open(ASSETS / "white_car.png"), "blue", Image.open(ASSETS / "blue_car.png"), "red"]


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


def _find(folder: Path, names: tuple[str, ...], what: str) -> Path:
    for name in names:
        if (folder / name).exists():
            return folder / name
    raise FileNotFoundError(f"no {what} in {folder}: looked for {', '.join(names)}")


def run_demo(models_dir: str | os.PathLike | None = None, out_dir: str | os.PathLike = "demo_output",
             seed: int = 0, steps: int = STEPS, guidance: float = GUIDANCE, size: int = SIZE,
             device: str | None = None, log=print) -> dict:
    """Run the example and write image.png, answer.txt and timings.json to `out_dir`."""
    started = time.perf_counter()
    tiny = models_dir is None
    if tiny:
        log("No --models-dir: using tiny random models. Every step runs, but random weights draw noise.")
    models = ensure_tiny_models() if tiny else Path(models_dir)
    vlm_path = _find(models, VLM_NAMES, "Qwen2-VL folder")
    aligner_path = _find(models, ALIGNER_NAMES, "ThinkDiff-LVLM aligner")
    flux_path = _find(models, FLUX_NAMES, "FLUX.1 diffusers folder")
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

    reasoner = timed("load_vlm_s", lambda: Reasoner.from_pretrained(vlm_path, device=device))
    aligner = timed("load_aligner_s", lambda: load_aligner(aligner_path, device=reasoner.device))
    if aligner.in_features != reasoner.hidden_size:
        raise ValueError(f"aligner {aligner_path} takes {aligner.in_features}-d states but the VLM "
                         f"{vlm_path} has hidden size {reasoner.hidden_size}")
    reasoning = timed("reason_s", lambda: reasoner.reason(example_items(), seed=seed))
    aligned = timed("align_s", lambda: aligner(reasoning.hidden_states))
    tokens = len(reasoning.token_ids)
    del reasoner  # the VLM leaves memory before FLUX arrives
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    pipe = timed("load_flux_s", lambda: load_flux(flux_path, device=device))
    image = timed("render_s", lambda: render(pipe, aligned.float(), seed=seed, steps=steps, guidance=guidance,
                                             height=size, width=size))
    timings["total_s"] = round(time.perf_counter() - started, 3)
    timings["reason_tokens_per_s"] = round(tokens / timings["reason_s"], 2)

    image.save(out / "image.png")
    (out / "answer.txt").write_text(reasoning.text + "\n")
    report = {"models": "tiny-random" if tiny else str(models), "vlm": str(vlm_path), "aligner": str(aligner_path),
              "flux": str(flux_path), "device": str(aligned.device), "seed": seed, "steps": steps,
              "guidance": guidance, "size": size, "generated_tokens": tokens, "timings": timings}
    (out / "timings.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"VLM answer: {reasoning.text}")
    log(f"Wrote {out / 'image.png'}, {out / 'answer.txt'} and {out / 'timings.json'}")
    if tiny:
        log("(Tiny random models: the image is noise and the answer gibberish by design.)")
    return report
