"""Model files: checks of downloaded safetensors, and the files this library writes (converted aligners,
the extracted vision tower, trained aligners)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

MAX_SAFETENSORS_HEADER = 100_000_000  # bytes: the safetensors library's own limit
GIT_LFS_POINTER = b"version https://git-lfs"


def check_safetensors_file(path: str | os.PathLike) -> None:
    """Raise a clear error unless `path` is a whole .safetensors file (a few KB read, not the weights).

    A cut-off download otherwise fails deep inside the loader with safetensors' "incomplete metadata,
    file not fully covered", naming no file; a Git LFS pointer (a clone without `git lfs pull`) with a
    header-length error.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        start = f.read(8)
        if start + f.read(len(GIT_LFS_POINTER) - 8) == GIT_LFS_POINTER:
            raise ValueError(f"{path} is a Git LFS pointer, not the weights: download the file itself "
                             f"(e.g. `git lfs pull` in that clone)")
        length = int.from_bytes(start, "little") if len(start) == 8 else -1
        if not 0 < length <= min(MAX_SAFETENSORS_HEADER, size - 8):
            raise ValueError(f"{path} is not a .safetensors file, or an incomplete download ({size} bytes); "
                             f"download it again")
        f.seek(8)
        try:
            header = json.loads(f.read(length))
            ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
            if not all(type(end) is int for end in ends):
                raise ValueError("data_offsets are not integers")
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise ValueError(f"{path} has an unreadable .safetensors header ({e}); download it again") from e
    end = max(ends, default=0)
    expected = 8 + length + end
    if size != expected:
        problem = "an incomplete download" if size < expected else "longer than its header says"
        raise ValueError(f"{path} is {problem}: {size:,} bytes where its header describes {expected:,}; "
                         f"download it again")


def check_safetensors_folder(folder: str | os.PathLike) -> None:
    """check_safetensors_file for the weight files of a Hugging Face or diffusers folder: the shards that
    its *.safetensors.index.json names (each must be there), else every *.safetensors."""
    folder = Path(folder)
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        index = indexes[0]
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ValueError(f"{index} is not a readable safetensors index ({e}); download it again") from e
        check_shards(folder, shards, f" of the weight files its {index.name} lists")
    else:
        for path in sorted(folder.glob("*.safetensors")):
            check_safetensors_file(path)


def check_shards(folder: Path, shards, which: str) -> None:
    """Each of `shards` (file names in `folder`) is there and whole; `which` follows the missing ones' names
    in the error, saying where the list came from."""
    missing = [shard for shard in shards if not (folder / shard).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}{which}; download the missing ones")
    for shard in shards:
        check_safetensors_file(folder / shard)


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """safetensors' save_file, leaving the file readable as any other new file of the user's.

    safetensors 0.8 writes through a temporary file made with mode 0600 (safetensors issue #782), so a
    ComfyUI running as another user (a container, a service account) could not read the model.
    """
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    if os.name == "posix":
        umask = os.umask(0)  # reading the umask means setting it; restored at once
        os.umask(umask)
        os.chmod(path, 0o666 & ~umask)
