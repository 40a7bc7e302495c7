"""ComfyUI-ThinkDiff: ThinkDiff (arXiv 2502.10458) reasoning conditioning for FLUX.1 in ComfyUI.

ComfyUI imports this file as a package; transformers and diffusers load only when a model does.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
