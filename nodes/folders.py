"""Where the pack's models live: ComfyUI's model folders, extra_model_paths.yaml included.

Qwen2-VL is a Hugging Face folder (config.json, shards, tokenizer) under models/LLM or
models/thinkdiff; aligners are single .safetensors/.pth files under models/thinkdiff.
"""

from __future__ import annotations

import os

import folder_paths

VLM_KEYS = ("LLM", "thinkdiff")
ALIGNER_KEY = "thinkdiff"
ALIGNER_EXTENSIONS = (".safetensors", ".pth")
MAX_DEPTH = 2  # models/LLM/<group>/<model>/config.json, as other VLM packs lay them out


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
    """(relative name, folder, files) below `base`, not descending into model folders."""
    for root, dirs, files in os.walk(base, followlinks=True):
        relative = os.path.relpath(root, base)
        depth = 0 if relative == "." else relative.count(os.sep) + 1
        is_model_folder = relative != "." and "config.json" in files
        dirs[:] = [] if is_model_folder or depth >= MAX_DEPTH else sorted(d for d in dirs if not d.startswith("."))
        yield relative.replace(os.sep, "/"), root, files, is_model_folder


def vlm_folders() -> dict[str, str]:
    """Display name -> folder for every Hugging Face model folder (has config.json)."""
    found: dict[str, str] = {}
    for base in search_paths(VLM_KEYS):
        for name, root, _files, is_model_folder in _walk(base):
            if is_model_folder:
                found.setdefault(name, root)
    return dict(sorted(found.items()))


def aligner_files() -> dict[str, str]:
    """Display name -> file for every .safetensors/.pth outside model folders."""
    found: dict[str, str] = {}
    for base in search_paths([ALIGNER_KEY]):
        for name, root, files, is_model_folder in _walk(base):
            if is_model_folder:
                continue
            for file in sorted(files):
                if file.endswith(ALIGNER_EXTENSIONS):
                    found.setdefault(file if name == "." else f"{name}/{file}", os.path.join(root, file))
    return dict(sorted(found.items()))


def not_found(what: str, name: str, keys) -> str:
    searched = ", ".join(search_paths(keys)) or "(no folders registered)"
    return f"{what} '{name}' not found; searched {searched}"
