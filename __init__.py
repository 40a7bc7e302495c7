"""ComfyUI-ThinkDiff: ThinkDiff (arXiv 2502.10458) reasoning conditioning for FLUX.1 in ComfyUI.

ComfyUI imports this file as a package; model code is imported only when a node runs.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
