"""Model files this library writes (converted aligners, the extracted vision tower, trained aligners)."""

from __future__ import annotations

import os

import torch


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
