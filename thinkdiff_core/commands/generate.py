"""Standalone generation through diffusers' FluxPipeline: both variants, several seeds, reproducible runs.

A run writes `run.json` (every parameter, the software versions and the outputs); `generate --config
run.json` runs it again. Each seed's image is written, and run.json rewritten to list it, as soon as it is
drawn (every file written aside and renamed into place), so an interrupted run keeps what it drew; the
same command continues it. A folder holds one run: images of a run with other parameters are never mixed in.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from .. import compose, condition
from ..aligner import aligner_state_dict, load_aligner, width_mismatch
from ..files import atomic_write_text, read_json, written_aside
from ..reason import Reasoner, check_vlm_folder, quantization_config, variation_seeds
from ..render import GUIDANCE, SIZE, STEPS, check_flux_folder, check_options, free_memory, load_flux, render
from ..vision import VisionEncoder, vision_hidden_size

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# The parameters of a run (what run.json holds besides its results).
DEFAULTS = {"variant": "lvlm", "items": [], "images": [], "prompt": "", "instruction": None, "seeds": [0],
            "variations": 1, "steps": STEPS, "guidance": GUIDANCE, "size": None, "temperature": 0.6, "top_p": 0.9,
            "max_new_tokens": 128, "device": None, "quantize": None, "vlm": None, "aligner": None, "vision": None, "flux": None}
REQUIRED = {"lvlm": ("vlm", "aligner", "flux", "items"), "clip": ("vision", "aligner", "flux", "images")}
# Reasonings decoded together at most (the fast path's batch; the Reason node's limit too).
MAX_BATCH = 16


# C0 controls but newline and tab, DEL, and C1 controls: a model's answer may hold any of them, and printed
# raw they could move the cursor, clear the screen or retitle the terminal.
CONTROL_CHARACTERS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` for a terminal: each control character escaped as \\xNN (newlines and tabs kept)."""
    return CONTROL_CHARACTERS.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def is_image_path(item: str) -> bool:
    return item.lower().endswith(IMAGE_SUFFIXES)


def open_image(path: str) -> Image.Image:
    if not Path(path).is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        return Image.open(path)
    except UnidentifiedImageError as e:
        raise ValueError(f"{path}: not an image file PIL can read") from e


def load_items(items: list[str]) -> list:
    """Command-line items to the in-context sequence: image paths (by suffix) become images, the rest words."""
    return [open_image(item) if is_image_path(item) else item for item in items]


def check_item_paths(items: list[str]) -> None:
    """The rule of the ComfyUI node (prompt.interleave): word, image, word, image, ..., then the query word."""
    rule = "--items go word, image, word, image, ..., then the query word"
    for n, item in enumerate(items, start=1):
        if not is_image_path(item) and Path(item).is_file():
            raise ValueError(f"item {n} ({item!r}) is a file but not an image ending in {', '.join(IMAGE_SUFFIXES)}")
        if n % 2 == 0 and not is_image_path(item):
            raise ValueError(f"{rule}: item {n} ({item!r}) should be an image (a path ending in "
                             f"{', '.join(IMAGE_SUFFIXES)})")
        if n % 2 == 1 and is_image_path(item):
            raise ValueError(f"{rule}: item {n} ({item!r}) should be a word")
        if is_image_path(item) and not Path(item).is_file():
            raise FileNotFoundError(f"image not found: {item}")
    if len(items) % 2 == 0:
        raise ValueError(f"{rule}: the last item is an image; add the query word after it")


def vlm_hidden_size(folder: str | os.PathLike) -> int:
    """The hidden size in a VLM folder's config.json, read without loading the model."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    return config.get_text_config().hidden_size


def flux_text_width(folder: str | os.PathLike) -> int | None:
    """The width of the T5 features a diffusers FLUX folder reads (transformer/config.json), or None."""
    try:
        return int(read_json(Path(folder) / "transformer" / "config.json")["joint_attention_dim"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_aligner_width(d_in: int, hidden_size: int, aligner_name: str, vlm_name: str) -> None:
    """The aligner reads the VLM's states: its input width must be the VLM's hidden size."""
    if d_in != hidden_size:
        raise ValueError(f"aligner {aligner_name} takes {d_in}-d states but the VLM {vlm_name} has "
                         f"hidden size {hidden_size}")


def check_flux_width(d_out: int, aligner_name: str, flux: str | os.PathLike) -> None:
    """The aligner writes FLUX's T5 features: its output width must be the one the FLUX folder reads."""
    width = flux_text_width(flux)
    if width is not None and d_out != width:
        raise ValueError(f"aligner {aligner_name} writes {d_out}-d features but the FLUX in {flux} reads "
                         f"{width}-d T5 features")


def check_aligner_fit(params: dict) -> None:
    """The aligner reads the VLM's states (lvlm) or the vision tower's tokens (clip) and writes FLUX's T5
    features: both widths are checked against the configs before any large model loads."""
    weights, _ = aligner_state_dict(params["aligner"])  # also refuses an unreadable or foreign file
    d_out, d_in = weights["0.weight"].shape
    if params["variant"] == "lvlm":
        check_aligner_width(d_in, vlm_hidden_size(params["vlm"]), params["aligner"], params["vlm"])
    else:
        width = vision_hidden_size(params["vision"])
        if width is not None and d_in != width:
            raise ValueError(width_mismatch(params["aligner"], d_in, f"the vision encoder {params['vision']}", width))
    check_flux_width(d_out, params["aligner"], params["flux"])


# Options of one variant that the other does not use (--top-p etc. on the command line).
OTHER_VARIANT_OPTIONS = {"lvlm": ("images", "prompt", "vision"),
                         "clip": ("items", "instruction", "vlm", "quantize", "temperature", "top_p", "max_new_tokens",
                                  "variations")}


def check_params(params: dict) -> dict:
    recorded = ("outputs", "versions", "timings", "conditioning_tokens", "device_used")  # a run's results
    unknown = sorted(set(params) - set(DEFAULTS) - set(recorded))
    if unknown:
        raise ValueError(f"unknown parameters: {', '.join(unknown)}")
    params = {**DEFAULTS, **{k: v for k, v in params.items() if k not in recorded}}
    if params["variant"] not in REQUIRED:
        raise ValueError(f"variant must be lvlm or clip, got {params['variant']!r}")
    missing = [name for name in REQUIRED[params["variant"]] if not params[name]]
    if missing:
        raise ValueError(f"the {params['variant']} variant needs --{' --'.join(missing)}")
    unused = [name for name in OTHER_VARIANT_OPTIONS[params["variant"]] if params[name] != DEFAULTS[name]]
    if unused:
        options = ", ".join("--" + name.replace("_", "-") for name in unused)
        raise ValueError(f"the {params['variant']} variant does not use {options} (given); leave "
                         f"{'it' if len(unused) == 1 else 'them'} out or choose the other --variant")
    if not params["seeds"]:
        raise ValueError("give at least one seed")
    for seed in params["seeds"]:
        variation_seeds(seed, params["variations"])
    # Everything that can be checked without loading a model, so that a mistake costs seconds, not minutes.
    check_options(params["steps"], params["size"], params["device"])
    if params["quantize"] is not None:
        quantization_config(params["quantize"], torch.bfloat16)  # refuses an unknown mode or a missing bitsandbytes
    if params["variant"] == "lvlm":
        check_item_paths(params["items"])
        check_vlm_folder(Path(params["vlm"]))
    else:
        for path in params["images"]:
            open_image(path).close()
    check_flux_folder(params["flux"])
    check_aligner_fit(params)
    # Absolute paths, so that run.json reruns from any folder.
    for name in ("vlm", "aligner", "vision", "flux"):
        if params[name]:
            params[name] = os.path.abspath(params[name])
    params["images"] = [os.path.abspath(path) for path in params["images"]]
    params["items"] = [os.path.abspath(item) if is_image_path(item) else item for item in params["items"]]
    return params


def _versions() -> dict:
    import diffusers
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "diffusers": diffusers.__version__}


class Timings(dict):
    """Seconds per named step (accumulated), synchronised with the GPU so that they mean something."""

    @contextmanager
    def __call__(self, name: str):
        started = time.perf_counter()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self[name] = round(self.get(name, 0.0) + time.perf_counter() - started, 3)


def draw(params: dict, log=print, progress: bool = True, on_image=None) -> tuple[dict, dict]:
    """Run a checked job: {seed: (image, VLM answer or None)} and a report (timings, token count, device);
    on_image(seed, image, answer), if given, as each image is drawn.

    The seeds' reasonings are decoded together, up to MAX_BATCH at a time (Reasoner.reason_variations: each is
    its seed's single reasoning up to the rounding of batched products). One model family is in memory at a
    time: the VLM (or vision tower) leaves before FLUX arrives."""
    from tqdm.auto import tqdm

    timings, started = Timings(), time.perf_counter()
    size = params["size"] or SIZE[params["variant"]]
    conditionings = {}  # seed -> (aligned tokens, answer text or None)
    seeds = drawn_seeds(params["seeds"], params["variations"])
    if params["variant"] == "lvlm":
        items = load_items(params["items"])
        with timings("load_aligner_s"):
            aligner = load_aligner(params["aligner"])
        with timings("load_vlm_s"):
            batches = [seeds[i:i + MAX_BATCH] for i in range(0, len(seeds), MAX_BATCH)]
            # One reasoning run would be over before a background compilation of the decode step is.
            compile = None if len(batches) > 1 else False
            reasoner = Reasoner.from_pretrained(params["vlm"], device=params["device"], quantization=params["quantize"],
                                                compile=compile)
        aligner.to(reasoner.device)
        for batch in batches:
            with tqdm(total=params["max_new_tokens"], desc=f"reasoning ({seed_list(batch)})",
                      disable=not progress) as bar, timings("reason_s"):
                def advance(done, total):  # steps: a token of every seed each on the fast path
                    bar.total = total
                    bar.update(done - bar.n)

                results = reasoner.reason_variations(items, instruction=params["instruction"], seeds=batch,
                                                     temperature=params["temperature"], top_p=params["top_p"],
                                                     max_new_tokens=params["max_new_tokens"], on_token=advance)
            for result in results:
                with timings("align_s"), torch.inference_mode():
                    conditionings[result.seed] = (aligner(result.hidden_states).float(), result.text)
                log(f"seed {result.seed}: {printable(result.text)}")  # the files keep the answer as the model gave it
        timings["reason_tokens_per_s"] = round(len(seeds) * params["max_new_tokens"] / timings["reason_s"], 2)
        del reasoner, aligner
    else:
        with timings("load_aligner_s"):
            aligner = load_aligner(params["aligner"])
        with timings("load_vision_s"):
            vision = VisionEncoder.from_pretrained(params["vision"], device=params["device"])
        aligner.to(vision.device)
        with timings("encode_s"):
            tokens = compose.image_tokens(vision, aligner, [open_image(path) for path in params["images"]]).float()
        conditionings = {seed: (tokens, None) for seed in seeds}
        del vision, aligner
    free_memory()

    with timings("load_flux_s"):
        pipe = load_flux(params["flux"], device=params["device"])
    drawn = {}
    for seed, (tokens, answer) in conditionings.items():
        # diffusers' tqdm bar, named like the reasoning bar (the config is replaced whole: disable again too).
        pipe.set_progress_bar_config(disable=not progress, desc=f"FLUX seed {seed}")
        inputs = condition.flux_inputs(pipe, tokens) if params["variant"] == "lvlm" else \
            compose.flux_inputs(pipe, tokens, params["prompt"])
        with timings("render_s"):
            drawn[seed] = (render(pipe, *inputs, seed=seed, steps=params["steps"], guidance=params["guidance"],
                                  height=size, width=size), answer)
        if on_image is not None:
            on_image(seed, *drawn[seed])
    timings["total_s"] = round(time.perf_counter() - started, 3)
    return drawn, {"timings": timings, "conditioning_tokens": inputs[0].shape[1],
                   "device_used": str(pipe._execution_device)}


def drawn_seeds(seeds, variations) -> list[int]:
    """Every seed a run draws: each given seed s and, with variations, s + 1 ... s + variations - 1 (once each,
    in order). Values that are no seeds (a damaged run.json) are left out."""
    drawn = []
    for seed in seeds:
        try:
            drawn += [s for s in variation_seeds(seed, variations) if s not in drawn]
        except ValueError:
            continue
    return drawn


def seed_list(seeds: list[int]) -> str:
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"


def earlier_outputs(out: Path, record: dict) -> list[dict]:
    """The outputs an interrupted run of the same parameters left in `out` (its run.json), to keep.

    A folder holds one run: images of a run with other parameters are refused, not mixed in. A run.json that
    lists no image (its run drew none) is taken over, with the image a kill may have left unlisted."""
    path = out / "run.json"
    if not path.is_file():
        return []
    try:
        stored = read_json(path, "a run record")
        if not isinstance(stored.get("outputs", []), list):
            raise ValueError("not a JSON object with a list of outputs")
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"--out {out} holds a run.json that is no run record ({e}); choose another --out") from e
    changed = [f"{name} {json.dumps(stored.get(name, DEFAULTS[name]))} there, {json.dumps(record[name])} now"
               for name in DEFAULTS if stored.get(name, DEFAULTS[name]) != record[name]]
    # Only this command's own names (a record names no other file), and an image since removed is drawn again.
    outputs = [o for o in stored.get("outputs", []) if isinstance(o, dict) and isinstance(o.get("seed"), int)
               and o.get("image") == f"seed_{o['seed']}.png" and (out / o["image"]).is_file()]
    if changed and outputs:
        raise ValueError(f"--out {out} holds the images of another run (its run.json: {'; '.join(changed)}); "
                         f"choose another --out, or run that one again to continue it")
    if changed:
        stored_seeds = stored.get("seeds", [])
        for seed in drawn_seeds(stored_seeds if isinstance(stored_seeds, list) else [], stored.get("variations", 1)):
            for suffix in (".png", ".txt"):
                (out / f"seed_{seed}{suffix}").unlink(missing_ok=True)
    return outputs


def writable_out(out: Path) -> bool:
    """Make `out` (when missing) before any model loads, so that an unusable folder fails in seconds; True if
    it was made here."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; give a folder for the images and run.json")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot make that folder ({e.strerror}); give a folder you may write to") \
            from e
    return created


def generate(params: dict, out_dir: str | os.PathLike, log=print, progress: bool = True) -> dict:
    """Run one generation job; returns the run record also written to `out_dir/run.json`.

    Each seed's image (and answer) is written, and run.json rewritten to list it, as soon as it is drawn. A
    folder holding an interrupted run of the same parameters is continued: only the seeds it lacks are drawn."""
    params = check_params(params)
    out = Path(out_dir)
    record = {**params, "size": params["size"] or SIZE[params["variant"]], "versions": _versions(), "outputs": []}
    record["outputs"] = earlier_outputs(out, record)
    created = writable_out(out)

    def write_record():
        atomic_write_text(out / "run.json", json.dumps(record, indent=2) + "\n")

    def where():  # the last line: where the outputs are
        images = ", ".join(str(out / output["image"]) for output in record["outputs"])
        log(f"images: {images}; record: {out / 'run.json'}")

    try:
        write_record()  # before any model loads: a folder that takes no files fails now
    except OSError as e:
        raise ValueError(f"--out {out} is not writable ({e.strerror}); give a folder you may write to") from e
    done = [output["seed"] for output in record["outputs"]]
    every_seed = drawn_seeds(params["seeds"], params["variations"])
    remaining = [seed for seed in every_seed if seed not in done]
    if not remaining:
        log(f"{out} already holds every seed of this run ({seed_list(done)}): nothing to draw")
        where()
        return record

    def save(seed, image, answer):
        name = f"seed_{seed}"
        with written_aside(out / f"{name}.png") as temporary:
            image.save(temporary, format="PNG")
        output = {"seed": seed, "image": f"{name}.png"}
        if answer is not None:
            atomic_write_text(out / f"{name}.txt", answer + "\n")
            output.update(answer=answer, answer_file=f"{name}.txt")
        record["outputs"].append(output)
        write_record()  # after the files it lists
        log(f"wrote {out / (name + '.png')}")

    try:
        _, report = draw({**params, "seeds": remaining, "variations": 1}, log, progress, on_image=save)
    except BaseException as e:
        kept = [output["seed"] for output in record["outputs"]]
        if not kept:  # a run that drew nothing leaves nothing behind (no empty folder, no record of nothing)
            (out / "run.json").unlink(missing_ok=True)
            if created and not any(out.iterdir()):
                out.rmdir()
        if isinstance(e, KeyboardInterrupt):
            missing = [seed for seed in every_seed if seed not in kept]
            what = f"{seed_list(kept)} kept in {out} (listed in its run.json)" if kept else "no image drawn yet"
            raise KeyboardInterrupt(f"interrupted; {what}; run the same command again to draw "
                                    f"{seed_list(missing)}") from None
        raise
    record.update(report)
    write_record()
    where()
    return record


def read_config(path: str) -> dict:
    """The parameters of a run.json given to --config."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--config {path}: file not found (expected the run.json of an earlier run)")
    try:
        return read_json(path, "a run.json (a JSON object of parameters)")
    except ValueError as e:
        raise ValueError(f"--config {e}") from e


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("generate", help="draw with ThinkDiff through diffusers (several seeds, reproducible)")
    parser.add_argument("--config", help="a run.json of an earlier run: run it again (other options override it)")
    # Defaults stay None here, so that --config's values stand where no option is given: each help says the default.
    parser.add_argument("--variant", choices=["lvlm", "clip"], help=f"(default: {DEFAULTS['variant']})")
    parser.add_argument("--vlm", help="lvlm: Qwen2-VL folder")
    parser.add_argument("--aligner", help="the variant's aligner (.safetensors or .pth)")
    parser.add_argument("--vision", help="clip: BLIP-2 vision file or folder")
    parser.add_argument("--flux", help="FLUX.1 diffusers folder")
    parser.add_argument("--items", nargs="+", help="lvlm: words and image paths in order, e.g. white a.jpg blue b.jpg red")
    parser.add_argument("--images", nargs="+", help="clip: images to compose, in order")
    parser.add_argument("--prompt", help="clip: text composed with the images")
    parser.add_argument("--instruction", help="lvlm: replaces the paper's instruction")
    parser.add_argument("--seeds", nargs="+", type=int,
                        help=f"one image per seed (default: {' '.join(map(str, DEFAULTS['seeds']))})")
    parser.add_argument("--variations", type=int,
                        help="lvlm: for each seed s also s+1 ... s+N-1, an image each; all reasonings are decoded "
                             f"together, {MAX_BATCH} at a time (default: {DEFAULTS['variations']})")
    parser.add_argument("--steps", type=int, help=f"FLUX steps (default: {DEFAULTS['steps']})")
    parser.add_argument("--guidance", type=float, help=f"FLUX guidance (default: {DEFAULTS['guidance']})")
    parser.add_argument("--size", type=int, help=f"image width and height (default: {SIZE['lvlm']} for lvlm, "
                        f"{SIZE['clip']} for clip)")
    parser.add_argument("--temperature", type=float,
                        help=f"lvlm: reasoning's sampling temperature (default: {DEFAULTS['temperature']})")
    parser.add_argument("--top-p", dest="top_p", type=float,
                        help=f"lvlm: reasoning's nucleus sampling (default: {DEFAULTS['top_p']})")
    parser.add_argument("--max-new-tokens", dest="max_new_tokens", type=int,
                        help=f"lvlm: tokens the VLM reasons, all of them conditioning FLUX (default: "
                             f"{DEFAULTS['max_new_tokens']})")
    parser.add_argument("--device", help="e.g. cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--quantize", choices=["8bit", "4bit"], help="lvlm: load Qwen2-VL quantised (bitsandbytes) "
                        "for GPUs of 24 GB or less; its states drift from the bf16 ones the aligner was trained on")
    parser.add_argument("--out", default="generate_output", help="output folder (default: %(default)s)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    params = read_config(args.config) if args.config else {}
    options = {k: v for k, v in vars(args).items()
               if k not in ("command", "run", "config", "out") and v is not None}
    # A run.json may hold options its variant never used (older versions recorded them, or --variant
    # switches): they are not asked for now, so they are dropped rather than refused.
    variant = options.get("variant", params.get("variant", "lvlm"))
    params = {k: v for k, v in params.items() if k not in OTHER_VARIANT_OPTIONS.get(variant, ())}
    generate({**params, **options}, args.out)
