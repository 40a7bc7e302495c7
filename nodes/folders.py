"""Where the pack's models live: ComfyUI's model folders, extra_model_paths.yaml included.

Qwen2-VL (and a whole BLIP-2) is a Hugging Face folder (config.json, shards, tokenizer) under models/LLM
or models/thinkdiff; aligners are single .safetensors/.pth files under models/thinkdiff; BLIP-2's
extracted vision tower is a .safetensors under models/thinkdiff or models/clip_vision. Lists are
filtered by what the files hold, so other packs' models in the same folders are left out.
"""

from __future__ import annotations

import os
import struct

import folder_paths

from ..thinkdiff_core.files import MAX_SAFETENSORS_HEADER, parse_json, read_json

VLM_KEYS = ("LLM", "thinkdiff")
ALIGNER_KEY = "thinkdiff"
VISION_KEYS = ("thinkdiff", "clip_vision")
MAX_DEPTH = 2  # models/LLM/<group>/<model>/config.json, as other VLM packs lay them out
ALIGNER_KEY_PREFIX = "mm_projector."
BLIP2_VISION_KEY = "vision_model.encoder.layers.0.self_attn.qkv.weight"  # EVA's fused qkv, not CLIP vision's


def register() -> None:
    """Add models/LLM and models/thinkdiff, keeping paths that extra_model_paths.yaml added."""
    for key in VLM_KEYS:
        default = os.path.join(folder_paths.models_dir, key)
        known = folder_paths.folder_names_and_paths.get(key, ([], set()))[0]
        if default not in known:
            folder_paths.add_model_folder_path(key, default)


def search_paths(keys) -> list[str]:
    paths = []
    for key in keys:
        if key in folder_paths.folder_names_and_paths:
            paths += [p for p in folder_paths.get_folder_paths(key) if p not in paths]
    return paths


def _walk(base: str):
    """(relative name, folder, files, is a model folder) below `base`, not descending into model folders."""
    for root, dirs, files in os.walk(base, followlinks=True):
        relative = os.path.relpath(root, base)
        depth = 0 if relative == "." else relative.count(os.sep) + 1
        is_model_folder = relative != "." and "config.json" in files
        dirs[:] = [] if is_model_folder or depth >= MAX_DEPTH else sorted(d for d in dirs if not d.startswith("."))
        yield relative.replace(os.sep, "/"), root, files, is_model_folder


def _model_type(folder: str) -> str | None:
    """config.json's model_type; None where it is unreadable (of any content: other packs' folders share
    models/LLM), so that the folder is listed and loading it names what is wrong."""
    try:
        return read_json(os.path.join(folder, "config.json")).get("model_type")
    except (OSError, ValueError):
        return None


def safetensors_keys(path: str) -> set[str] | None:
    """The tensor names in a .safetensors header (a few KB read), or None if it cannot be read.

    Other packs' folders (clip_vision) may hold anything, e.g. a Git LFS pointer or a truncated
    download, whose first bytes read as a huge header length: such files are skipped, never raised on.
    """
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > min(MAX_SAFETENSORS_HEADER, os.fstat(f.fileno()).st_size - 8):
                return None
            header = parse_json(f.read(length), path)
    except (OSError, ValueError, struct.error):
        return None
    return set(header) - {"__metadata__"}


def _model_folders(keys, model_type: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for base in search_paths(keys):
        for name, root, _files, is_model_folder in _walk(base):
            if is_model_folder and _model_type(root) in (model_type, None):
                found.setdefault(name, root)
    return found


def _files(keys, keep) -> dict[str, str]:
    found: dict[str, str] = {}
    for base in search_paths(keys):
        for name, root, files, is_model_folder in _walk(base):
            if is_model_folder:
                continue
            for file in sorted(files):
                path = os.path.join(root, file)
                if keep(file, path):
                    found.setdefault(file if name == "." else f"{name}/{file}", path)
    return found


def vlm_folders() -> dict[str, str]:
    """Display name -> folder for every Qwen2-VL Hugging Face folder."""
    return dict(sorted(_model_folders(VLM_KEYS, "qwen2_vl").items()))


def aligner_files() -> dict[str, str]:
    """Display name -> file for every aligner (.pth, or .safetensors with mm_projector.* tensors)."""
    def is_aligner(file, path):
        if file.endswith(".pth"):
            return True
        keys = safetensors_keys(path) if file.endswith(".safetensors") else set()
        return keys is None or any(k.startswith(ALIGNER_KEY_PREFIX) for k in keys)

    return dict(sorted(_files([ALIGNER_KEY], is_aligner).items()))


def vision_models() -> dict[str, str]:
    """Display name -> path for BLIP-2 vision files (.safetensors) and whole BLIP-2 folders."""
    def is_blip2_vision(file, path):
        return file.endswith(".safetensors") and BLIP2_VISION_KEY in (safetensors_keys(path) or ())

    found = _files(VISION_KEYS, is_blip2_vision)
    for name, folder in _model_folders(VLM_KEYS, "blip-2").items():
        found.setdefault(name, folder)
    return dict(sorted(found.items()))


def not_found(what: str, name: str, keys) -> str:
    searched = ", ".join(search_paths(keys)) or "(no folders registered)"
    return f"{what} '{name}' not found; searched {searched}"
