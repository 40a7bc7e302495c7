"""The shipped workflows' input images, put into ComfyUI's input folder so that a template runs as it opens.

LoadImage only reads that folder. Each image goes there under a name of the pack's own (thinkdiff_<name>.png),
only where no file of that name exists: a user's file is never replaced, and one they edited stays theirs.
"""

from __future__ import annotations

import logging
import os

import folder_paths

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "thinkdiff_core", "assets")
EXAMPLE_IMAGES = ("white_car.png", "blue_car.png", "cat.png", "pink_sunglasses.png")
PREFIX = "thinkdiff_"


def provide() -> None:
    """Copy the missing example images into the input folder; a folder that cannot take them only warns."""
    folder = folder_paths.get_input_directory()
    if not os.path.isdir(folder):  # ComfyUI makes it at startup; a host without one has no LoadImage to feed
        return
    for name in EXAMPLE_IMAGES:
        target = os.path.join(folder, PREFIX + name)
        try:
            with open(os.path.join(ASSETS, name), "rb") as source:
                data = source.read()
            # "x": created only if absent, so two ComfyUI processes sharing the folder cannot overwrite each other.
            with open(target, "xb") as copy:
                try:
                    copy.write(data)
                except OSError:
                    os.remove(target)  # no half-written image that would then never be replaced
                    raise
        except FileExistsError:
            continue
        except OSError as error:
            logging.warning("ThinkDiff: could not copy the example image %s into %s (%s); the shipped workflows "
                            "need it there: copy thinkdiff_core/assets/%s as %s%s yourself", name, folder, error,
                            name, PREFIX, name)
