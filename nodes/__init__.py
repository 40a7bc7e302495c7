"""Thin ComfyUI adapters over thinkdiff_core: inputs in, core call, ComfyUI types out."""

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
