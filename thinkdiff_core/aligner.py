"""The ThinkDiff aligner (`mlp2x_gelu_t5_norm`) and its checkpoint formats.

Linear(d_in -> d_out) -> exact GELU -> Linear(d_out -> d_out) -> T5 RMSNorm(d_out).
The official checkpoints keep it as the `nn.Sequential` called `mm_projector`, so the module
below uses the same child indices (0, 2, 3) and its state dict keys are the official ones
without the `mm_projector.` prefix.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch
from torch import nn

from .files import check_safetensors_file, check_torch_file, save_safetensors

PREFIX = "mm_projector."
EXPECTED_KEYS = ("0.weight", "0.bias", "2.weight", "2.bias", "3.weight")
T5_NORM_EPS = 1e-6
# The released aligners, told apart by their input width.
VARIANTS = {3584: "lvlm", 1408: "clip"}
VARIANT_NAMES = {"lvlm": "ThinkDiff-LVLM (Qwen2-VL-7B states)", "clip": "ThinkDiff-CLIP (BLIP-2 ViT-g features)"}
# Widths far beyond any VLM's hidden size or T5's (3584 and 4096 for the released aligners).
MAX_WIDTH = 65536


def width_mismatch(aligner: str, d_in: int, source: str, width: int) -> str:
    """The error for feeding `width`-d features from `source` to an aligner that takes `d_in`-d ones."""
    variant = VARIANTS.get(d_in)
    kind = f" (the {VARIANT_NAMES[variant]} aligner)" if variant else ""
    return (f"aligner {aligner} takes {d_in}-d features{kind} but {source} gives {width}-d; use the aligner "
            f"trained for it: ThinkDiff-LVLM's takes Qwen2-VL-7B's 3584-d states, ThinkDiff-CLIP's BLIP-2's "
            f"1408-d features")


class CheckpointError(ValueError):
    """An aligner file that cannot be used as it is; the message names the file."""


class T5RMSNorm(nn.Module):
    """T5's layer norm: scale only, no mean subtraction, variance in float32."""

    def __init__(self, width: int, eps: float = T5_NORM_EPS):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class Aligner(nn.Sequential):
    """Maps VLM token states [..., d_in] to T5-encoder space [..., d_out]."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(
            nn.Linear(in_features, out_features),
            nn.GELU(),  # exact (erf) GELU, as in the paper
            nn.Linear(out_features, out_features),
            T5RMSNorm(out_features),
        )
        self.in_features = in_features
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"aligner expects features of width {self.in_features} (the VLM hidden size it was "
                f"trained on), got a tensor of shape {tuple(x.shape)}"
            )
        first = self[0].weight
        return super().forward(x.to(device=first.device, dtype=first.dtype))


def _read_file(path: Path) -> tuple[dict, dict]:
    """The raw tensors of an aligner file and its metadata (safetensors only)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        check_safetensors_file(path)  # names a cut-off download or a Git LFS pointer
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{path}: not a readable .safetensors file ({e})") from e
    check_torch_file(path, "the official .pth or a .safetensors aligner", CheckpointError)
    try:
        # torch checks each storage's size in the pickle against its record before allocating it.
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # Only torch's diagnosis, without its advice to load with weights_only=False or to allowlist the globals.
        diagnosis = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\s*Please use|\n\n|$)", str(e), re.S)
        raise CheckpointError(
            f"{path}: refused to load. The file holds Python objects other than tensors and plain "
            f"containers, and loading it would run code. Only weights are accepted."
            + (f" Details: {diagnosis.group(1).strip()}" if diagnosis else "")
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path}: expected a dict (the official {{'model': ...}} checkpoint or a state dict), "
            f"got {type(obj).__name__}"
        )
    if "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    return obj, {}


def _check_tensor(path: Path, key: str, value) -> None:
    """An aligner weight is a dense floating-point tensor whose elements all have bytes of their own in the file:
    a view claiming more elements than its storage holds (stride 0, a 2 KB file "holding" 160 GB) is refused
    before any copy of it is made."""
    name = PREFIX + key
    if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
        raise CheckpointError(f"{path}: {name} is {type(value).__name__}"
                              f"{'' if not isinstance(value, torch.Tensor) else f' ({value.layout})'}; expected a "
                              f"dense tensor of weights")
    if not value.is_floating_point():
        raise CheckpointError(f"{path}: {name} holds {value.dtype} values; expected floating-point weights")
    claimed = value.numel() * value.element_size()
    held = value.untyped_storage().nbytes() - value.storage_offset() * value.element_size()
    if claimed > held:
        raise CheckpointError(f"{path}: {name} claims shape {tuple(value.shape)} ({claimed:,} bytes of "
                              f"{value.dtype}) but the file holds {max(held, 0):,} bytes for it; expected weights "
                              f"stored whole, as torch.save and safetensors write them")


def aligner_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """The aligner weights of a checkpoint, keyed as `Aligner` expects, and the file metadata.

    Accepts the official `.pth` ({"model": {...}, "optimizer": ..., ...}, possibly stripped to
    {"model": ...}), a bare state dict, and `.safetensors`, all with `mm_projector.*` keys.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; expected an aligner file (.safetensors or .pth)")
    if not path.is_file():
        raise FileNotFoundError(f"aligner checkpoint not found: {path}")
    raw, metadata = _read_file(path)
    weights = {k[len(PREFIX):]: v for k, v in raw.items() if isinstance(k, str) and k.startswith(PREFIX)}
    if not weights:
        shown = ", ".join(sorted(map(str, raw))[:8]) or "nothing"
        raise CheckpointError(
            f"{path}: no aligner weights found. Expected keys "
            f"{', '.join(PREFIX + k for k in EXPECTED_KEYS)} (ThinkDiff's mm_projector), "
            f"found: {shown}"
        )
    missing = [PREFIX + k for k in EXPECTED_KEYS if k not in weights]
    if missing:
        raise CheckpointError(
            f"{path}: incomplete aligner, missing {', '.join(missing)}. Expected the "
            f"mlp2x_gelu_t5_norm layout ({', '.join(PREFIX + k for k in EXPECTED_KEYS)})"
        )
    unexpected = sorted(set(weights) - set(EXPECTED_KEYS))
    if unexpected:
        raise CheckpointError(
            f"{path}: unexpected aligner keys {', '.join(PREFIX + k for k in unexpected)}; "
            f"this is not the mlp2x_gelu_t5_norm aligner ThinkDiff uses"
        )
    for key in EXPECTED_KEYS:
        _check_tensor(path, key, weights[key])
    layout = (f"the mlp2x_gelu_t5_norm aligner needs {PREFIX}0.weight [d_out, d_in], 0.bias [d_out], "
              f"2.weight [d_out, d_out], 2.bias [d_out], 3.weight [d_out]")
    if weights["0.weight"].dim() != 2:
        raise CheckpointError(f"{path}: {PREFIX}0.weight has shape {tuple(weights['0.weight'].shape)}; {layout}")
    d_out, d_in = weights["0.weight"].shape
    if not (0 < d_in <= MAX_WIDTH and 0 < d_out <= MAX_WIDTH):
        raise CheckpointError(f"{path}: {PREFIX}0.weight has shape {tuple(weights['0.weight'].shape)}; {layout} "
                              f"with d_in and d_out from 1 to {MAX_WIDTH:,}")
    expected = {"0.bias": (d_out,), "2.weight": (d_out, d_out), "2.bias": (d_out,), "3.weight": (d_out,)}
    for key, shape in expected.items():
        if tuple(weights[key].shape) != shape:
            raise CheckpointError(
                f"{path}: {PREFIX}{key} has shape {tuple(weights[key].shape)}, expected {shape}: "
                f"{layout} (here d_in={d_in}, d_out={d_out} from {PREFIX}0.weight)"
            )
    return weights, metadata


def load_aligner(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Aligner:
    """Load an aligner checkpoint; its dimensions come from the weights.

    `dtype=None` keeps float32 (the aligner is 33M parameters; its output feeds FLUX in float32
    in ComfyUI anyway). Weights are read with `torch.load(weights_only=True)` or safetensors only.
    """
    weights, _ = aligner_state_dict(path)
    d_out, d_in = weights["0.weight"].shape
    aligner = Aligner(d_in, d_out)
    aligner.load_state_dict({k: v.float() for k, v in weights.items()})
    return aligner.to(device=device or "cpu", dtype=dtype or torch.float32).eval().requires_grad_(False)


def convert_to_safetensors(src: str | os.PathLike, dst: str | os.PathLike, variant: str | None = None) -> dict:
    """Write only the aligner weights of `src` to `dst` (.safetensors) with variant/d_in/d_out metadata.

    Returns a report with both sizes in bytes. The variant is guessed from d_in when not given
    (3584: Qwen2-VL-7B, "lvlm"; 1408: BLIP-2 EVA ViT-g, "clip").
    """
    src, dst = Path(src), Path(dst)
    if dst.suffix != ".safetensors":
        raise ValueError(f"output must end in .safetensors, got {dst}")
    weights, _ = aligner_state_dict(src)
    d_out, d_in = weights["0.weight"].shape
    if variant is not None and VARIANTS.get(d_in, variant) != variant:
        raise ValueError(f"{src}: the aligner takes {d_in}-d inputs, the {VARIANT_NAMES[VARIANTS[d_in]]} width, "
                         f"not the {variant} variant's; leave --variant out to take it from the width")
    variant = variant or VARIANTS.get(d_in, "unknown")
    metadata = {"format": "pt", "variant": variant, "d_in": str(d_in), "d_out": str(d_out),
                "architecture": "mlp2x_gelu_t5_norm"}
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors({PREFIX + k: v.contiguous() for k, v in weights.items()}, dst, metadata=metadata)
    return {"input": str(src), "input_bytes": src.stat().st_size, "output": str(dst),
            "output_bytes": dst.stat().st_size, "variant": variant, "d_in": d_in, "d_out": d_out}

