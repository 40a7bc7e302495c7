"""The data the two training commands read: image sources (with captions, for ThinkDiff-CLIP) and the
shards prepare-lvlm writes (for ThinkDiff-LVLM)."""

from __future__ import annotations

import os
import tarfile
from io import BytesIO
from pathlib import Path

from PIL import Image

from ..files import parse_json

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def image_caption_samples(source: str | os.PathLike):
    """(key, image, caption or None) from a folder of images (caption: same-stem .txt) or WebDataset .tar shards."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"data not found: {source}")
    tars = [source] if source.suffix == ".tar" else sorted(source.glob("*.tar"))
    if tars:
        for tar in tars:
            members: dict[str, dict[str, bytes]] = {}
            with tarfile.open(tar) as archive:
                for member in archive:
                    if member.isfile():
                        key, _, extension = member.name.partition(".")
                        members.setdefault(key, {})[extension.lower()] = archive.extractfile(member).read()
            for key, parts in members.items():
                image = next((parts[e] for e in ("jpg", "jpeg", "png", "webp") if e in parts), None)
                if image is None:
                    continue
                caption = parts["txt"].decode() if "txt" in parts else \
                    parse_json(parts["json"], f"{tar}:{key}.json", "a sample's metadata").get("caption") \
                    if "json" in parts else None
                yield f"{tar.stem}/{key}", Image.open(BytesIO(image)), caption
        return
    images = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError(f"no images or .tar shards in {source}")
    for path in images:
        caption_path = path.with_suffix(".txt")
        yield (path.relative_to(source).with_suffix("").as_posix(), Image.open(path),
               caption_path.read_text().strip() if caption_path.is_file() else None)



def prepared_keys(folder: Path) -> dict[str, Path]:
    """The prepared samples' keys and their shards. Shards are written aside and renamed into place (a kill's
    leftover is a hidden .tmp file, never a shard), so one that is not whole was damaged otherwise: it is named."""
    from safetensors import SafetensorError, safe_open

    from ..files import check_safetensors_file

    keys = {}
    for shard in sorted(folder.glob("shard-*.safetensors")):
        try:
            check_safetensors_file(shard)
            with safe_open(str(shard), framework="pt") as f:
                keys.update({name.rsplit(".", 1)[0]: shard for name in f.keys()})
        except (ValueError, SafetensorError) as e:
            raise ValueError(f"{shard} is cut off or damaged (not a whole safetensors file); delete it and run "
                             f"prepare-lvlm again to prepare its samples anew") from e
    return keys

