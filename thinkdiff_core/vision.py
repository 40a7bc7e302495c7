"""ThinkDiff-CLIP's vision encoder: the BLIP-2 EVA ViT-g tower (1408-d) of Salesforce/blip2-flan-t5-xxl.

Each image goes through BLIP-2's processor (224x224, CLIP mean/std) and the vision model; of its last
hidden state, the CLS token is kept and the 16x16 patch grid is bilinearly resized
(align_corners=False) to 8x8: [CLS, 64 patches] = 65 tokens per image.

Weights come from a BLIP-2 Hugging Face folder, of which only the `vision_model.*` tensors are read
(the 11B T5 in the same shards is never touched), or from a vision-only .safetensors written by
`extract_vision` with the configs in its metadata.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from .files import (
    check_config_sizes,
    check_safetensors_file,
    check_shards,
    json_kind,
    parse_json,
    read_json,
    read_weight_map,
    save_safetensors,
)

PREFIX = "vision_model."
BLIP2_MODEL_TYPE = "blip-2"
DOWNSAMPLED_GRID = 8  # the 16x16 patch grid -> 8x8 (vision_downsample_factor 2)
# BLIP-2's released preprocessor_config.json, for vision-only files that carry none.
BLIP2_IMAGE_PROCESSOR = {
    "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "BlipImageProcessor", "resample": 3, "rescale_factor": 1 / 255,
    "size": {"height": 224, "width": 224},
}
CONFIG_BOOKKEEPING = ("model_type", "architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path")
QKV_KEY = PREFIX + "encoder.layers.0.self_attn.qkv.weight"  # EVA's fused qkv: BLIP-2, not CLIP vision


def downsample_tokens(hidden: torch.Tensor, grid: int = DOWNSAMPLED_GRID) -> torch.Tensor:
    """[n, 1 + g*g, d] -> [n, 1 + grid*grid, d]: CLS, then the patch grid bilinearly resized."""
    cls, patches = hidden[:, :1], hidden[:, 1:]
    side = int(round(patches.shape[1] ** 0.5))
    if side * side != patches.shape[1]:
        raise ValueError(f"expected a square patch grid after the CLS token, got {patches.shape[1]} patches")
    patches = patches.reshape(hidden.shape[0], side, side, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bilinear", align_corners=False)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(hidden.shape[0], grid * grid, -1)], dim=1)


def _vision_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Only the vision_model.* tensors of a (sharded) safetensors checkpoint."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_weight_map(index)
        shards: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            if key.startswith(PREFIX):
                shards.setdefault(shard, []).append(key)
        # Only the shards of the vision tower must be there: BLIP-2's T5 is not needed.
        check_shards(folder, shards, ", where its model.safetensors.index.json puts vision tower weights")
    elif (folder / "model.safetensors").is_file():
        check_safetensors_file(folder / "model.safetensors")
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            shards = {"model.safetensors": [k for k in f.keys() if k.startswith(PREFIX)]}
    else:
        raise FileNotFoundError(
            f"{folder} has no safetensors weights (model.safetensors or model.safetensors.index.json); "
            f"only safetensors checkpoints are read"
        )
    tensors = {}
    for shard, keys in shards.items():
        with safe_open(str(folder / shard), framework="pt") as f:
            tensors.update({key: f.get_tensor(key) for key in keys})
    return tensors


def _read_folder(folder: Path) -> tuple[dict, dict, dict]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} is not a Hugging Face model folder: config.json is missing")
    config = read_json(config_path, json_kind(config_path.name))
    if config.get("model_type") != BLIP2_MODEL_TYPE:
        raise ValueError(f"{folder} holds a {config.get('model_type')!r} model; ThinkDiff-CLIP needs BLIP-2 "
                         f"(model_type 'blip-2', e.g. Salesforce/blip2-flan-t5-xxl)")
    processor_path = folder / "preprocessor_config.json"
    processor = read_json(processor_path, json_kind(processor_path.name)) if processor_path.is_file() \
        else BLIP2_IMAGE_PROCESSOR
    return _vision_tensors(folder), config.get("vision_config", {}), processor


def _read_file(path: Path) -> tuple[dict, dict, dict]:
    from safetensors import safe_open

    check_safetensors_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys() if k.startswith(PREFIX)}
            metadata = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path}: not a readable .safetensors file ({e})") from e
    config = parse_json(metadata["vision_config"], f"{path} (its vision_config metadata)", "a vision config") \
        if "vision_config" in metadata else {}
    processor = parse_json(metadata["image_processor"], f"{path} (its image_processor metadata)",
                           "an image processor config") if "image_processor" in metadata else BLIP2_IMAGE_PROCESSOR
    return tensors, config, processor


def read_vision_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(vision_model.* tensors, vision config, image processor config) of a BLIP-2 folder or vision file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"vision encoder not found: {path}")
    tensors, config, processor = _read_folder(path) if path.is_dir() else _read_file(path)
    if QKV_KEY not in tensors:
        found = ", ".join(sorted(tensors)[:4]) or "no vision_model.* tensors"
        raise ValueError(
            f"{path}: not a BLIP-2 vision tower. Expected the EVA ViT keys {PREFIX}embeddings.*, {QKV_KEY}, ... "
            f"(Salesforce/blip2-flan-t5-xxl); found {found}"
        )
    source = path / "config.json" if path.is_dir() else f"{path} (its vision_config metadata)"
    if not isinstance(config, dict):
        raise ValueError(f"{source}: vision_config is {type(config).__name__}; expected a JSON object")
    check_config_sizes(config, source)
    return tensors, config, processor


def vision_hidden_size(path: str | os.PathLike) -> int | None:
    """The vision tower's width from its config (a folder's config.json, a vision file's metadata; BLIP-2's
    default where they give none, as the loader builds it), no weights read. None where unreadable: the
    loader then names the problem."""
    from safetensors import safe_open
    from transformers import Blip2VisionConfig

    path = Path(path)
    try:
        if path.is_dir():
            config = read_json(path / "config.json").get("vision_config", {})
        else:
            with safe_open(str(path), framework="pt") as f:
                config = parse_json((f.metadata() or {}).get("vision_config", "{}"), path)
        return int(config.get("hidden_size", Blip2VisionConfig().hidden_size))
    except Exception:  # noqa: BLE001 - safetensors and json raise many kinds; the loader reports them
        return None


def check_image_processor(path, processor: dict, image_size: int) -> None:
    """BLIP's image processor settings: images resized to the square the vision tower takes (another size
    fails inside its position embeddings), and mean, std and resampling of the types BlipImageProcessor uses."""
    size = processor.get("size", {"height": image_size, "width": image_size})
    size = {"height": size, "width": size} if type(size) is int else size
    if not (isinstance(size, dict) and size.get("height") == size.get("width") == image_size):
        raise ValueError(f"{path}: its image processor resizes to {size!r:.80}, but the vision tower takes "
                         f"{image_size}x{image_size} images (expected size {{'height': {image_size}, 'width': "
                         f"{image_size}}})")
    for key in ("image_mean", "image_std"):
        value = processor.get(key, [1.0])
        if not (isinstance(value, list) and len(value) in (1, 3)
                and all(type(v) in (int, float) and v == v and (key == "image_mean" or v > 0) for v in value)):
            raise ValueError(f"{path}: its image processor's {key} is {value!r:.80}; expected 3 numbers (one per "
                             f"colour{', above 0' if key == 'image_std' else ''})")
    resample = processor.get("resample", 3)
    if type(resample) is not int or not 0 <= resample <= 5:
        raise ValueError(f"{path}: its image processor's resample is {resample!r:.40}; expected a PIL "
                         f"resampling filter number from 0 to 5 (BLIP-2: 3, bicubic)")


class VisionEncoder:
    """BLIP-2's vision tower with its image processor, producing ThinkDiff-CLIP's 65 tokens per image."""

    def __init__(self, model, image_processor):
        self.model = model.eval()
        self.image_processor = image_processor
        self._lock = threading.Lock()  # calls from several threads take turns, as the Reasoner's do

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> "VisionEncoder":
        """From a BLIP-2 HF folder or a vision-only .safetensors; bf16 on GPU (as the paper), float32 on CPU."""
        import transformers.models.blip as blip
        from transformers import Blip2VisionConfig, Blip2VisionModel

        tensors, config, processor = read_vision_checkpoint(path)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        config = {k: v for k, v in config.items() if k not in CONFIG_BOOKKEEPING}
        try:
            config = Blip2VisionConfig(**config)
        except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as e:
            raise ValueError(f"{path}: not a usable BLIP-2 vision config ({type(e).__name__}: {e})") from e
        check_image_processor(path, processor, config.image_size)
        with torch.device("meta"):  # no random init of a billion parameters that are overwritten anyway
            model = Blip2VisionModel(config)
        state = {k[len(PREFIX):]: v for k, v in tensors.items()}
        expected = model.state_dict()
        if set(state) != set(expected):
            missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
            raise ValueError(f"{path}: the vision tensors do not match the vision config "
                             f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
        wrong = [f"{PREFIX}{k} is {list(v.shape)} where the config makes {list(expected[k].shape)}"
                 for k, v in state.items() if v.shape != expected[k].shape]
        if wrong:
            raise ValueError(f"{path}: the vision tensors do not match the vision config ({'; '.join(wrong[:2])})")
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
        # The PIL processor resamples as the authors' did; transformers 5 names it BlipImageProcessorPil
        # (its BlipImageProcessor resizes tensors with torchvision, slightly differently).
        processor_class = getattr(blip, "BlipImageProcessorPil", blip.BlipImageProcessor)
        image_processor = processor_class(**{k: v for k, v in processor.items()
                                             if k not in ("image_processor_type", "processor_class")})
        return cls(model.to(device), image_processor)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def encode(self, images) -> torch.Tensor:
        """PIL images -> [n, 65, hidden] float32 on CPU."""
        if not images:
            raise ValueError("no images to encode")
        with self._lock, torch.inference_mode():
            pixels = self.image_processor(images=list(images), return_tensors="pt").pixel_values
            first = next(self.model.parameters())
            hidden = self.model(pixel_values=pixels.to(device=first.device, dtype=first.dtype)).last_hidden_state
        return downsample_tokens(hidden).float().cpu()


def extract_vision(folder: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Write the vision tower of a BLIP-2 folder as one .safetensors with its configs as metadata."""
    folder, out = Path(folder), Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"output must end in .safetensors, got {out}")
    if not folder.is_dir():
        raise NotADirectoryError(f"expected a BLIP-2 Hugging Face folder, got {folder}")
    tensors, config, processor = read_vision_checkpoint(folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors({k: v.contiguous() for k, v in tensors.items()}, out, metadata={
        "format": "pt", "model": "blip-2 vision", "vision_config": json.dumps(config),
        "image_processor": json.dumps(processor),
    })
    return {"input": str(folder), "output": str(out), "output_bytes": out.stat().st_size, "tensors": len(tensors),
            "hidden_size": int(tensors[PREFIX + "embeddings.patch_embedding.weight"].shape[0])}
