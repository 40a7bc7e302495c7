"""Release checks for the libraries whose APIs moved between the versions ComfyUI users run."""

from __future__ import annotations


def release(module) -> tuple[int, int]:
    """(major, minor) of an imported module's __version__, e.g. (4, 57) or (5, 0)."""
    major, minor = module.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)
