"""Drawing with FLUX.1 through diffusers (the CLI and demo path; ComfyUI uses its own sampler)."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import torch
from PIL import Image

from .files import check_layers_held, check_model_folder, check_safetensors_folder, known_class
from .versions import release

# The paper's FLUX settings: CoBSAT reasoning at 512x512, composition at 1024x1024.
GUIDANCE = 3.5
STEPS = 28
SIZE = {"lvlm": 512, "clip": 1024}
# FLUX's latents are 8x smaller than the image and packed in 2x2 patches: sides are multiples of 16.
SIZE_MULTIPLE = 16


def check_options(steps: int, size: int | None, device: str | None = None) -> None:
    """Refuse rendering options that would only fail (or be silently changed) minutes later, inside diffusers."""
    if steps < 1:
        raise ValueError(f"--steps must be at least 1, got {steps}")
    if size is not None and (size < SIZE_MULTIPLE or size % SIZE_MULTIPLE):
        near = max(SIZE_MULTIPLE, size // SIZE_MULTIPLE * SIZE_MULTIPLE)
        raise ValueError(f"--size must be a positive multiple of {SIZE_MULTIPLE} (FLUX: VAE factor 8 x patch 2), "
                         f"got {size}; e.g. {near} or {near + SIZE_MULTIPLE}")
    check_device(device)


def check_device(device: str | None) -> None:
    """A --device that torch knows and this machine has (None: the default)."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device {device!r} is not a torch device, e.g. cuda, cuda:1 or cpu ({e})") from e
    if parsed.type == "cuda":
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus == 0:
            raise ValueError(f"--device {device}: no CUDA GPU is usable here (torch.cuda.is_available() is "
                             f"False); leave --device out or use --device cpu")
        if parsed.index is not None and parsed.index >= gpus:
            raise ValueError(f"--device {device}: this machine has {gpus} CUDA GPU(s), numbered from 0")


def check_flux_folder(folder: str | os.PathLike) -> None:
    """A diffusers FLUX folder whose parts' weight files are whole (a cut-off download is named now, not
    after the VLM has reasoned), whose JSON files are readable, plausible and no more than their weights hold,
    and which names only classes of diffusers and transformers (no code of its own)."""
    import diffusers
    import transformers

    folder = Path(folder)
    index = folder / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(
            f"{folder} is not a diffusers FLUX folder (model_index.json missing); expected a local "
            f"copy of black-forest-labs/FLUX.1-dev in diffusers layout"
        )
    libraries = {"diffusers": diffusers, "transformers": transformers}
    for part, entry in check_model_folder(folder)["model_index.json"].items():
        if part.startswith("_") or entry == [None, None]:  # bookkeeping, or an optional part left out
            continue
        # Any other library than these two would be a module of the folder's own, i.e. its own code.
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] in libraries
                and known_class(entry[1], libraries[entry[0]])):
            raise ValueError(f"{index}: {part} is {entry!r:.80}; expected [library, class] naming a class of "
                             f"diffusers or transformers (ThinkDiff never runs code from a model folder)")
        if (folder / part).is_dir():
            configs = check_model_folder(folder / part)
            shapes = check_safetensors_folder(folder / part)
            if "config.json" in configs:
                check_layers_held(configs["config.json"], folder / part / "config.json", shapes)


def free_memory() -> None:
    """Return what dropped models held, before the next model loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_flux(folder: str | os.PathLike, device: str | torch.device | None = None,
              dtype: torch.dtype | None = None):
    """A FluxPipeline from a local diffusers folder; on a GPU its parts move there only while used."""
    import diffusers
    from diffusers import FluxPipeline

    check_flux_folder(folder)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    dtype_option = "dtype" if release(diffusers) >= (0, 40) else "torch_dtype"  # renamed in diffusers 0.40
    pipe = FluxPipeline.from_pretrained(folder, local_files_only=True, trust_remote_code=False,
                                        **{dtype_option: dtype})
    if device.type == "cuda":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe, prompt_embeds: torch.Tensor, pooled: torch.Tensor, seed: int = 0, steps: int = STEPS,
           guidance: float = GUIDANCE, height: int = SIZE["lvlm"], width: int = SIZE["lvlm"]) -> Image.Image:
    """Draw one image from FLUX inputs (see condition.flux_inputs and compose.flux_inputs)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, height=height, width=width,
                num_inference_steps=steps, guidance_scale=guidance, generator=generator).images[0]
