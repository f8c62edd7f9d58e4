"""Attention Edit: localized, text-guided editing of real images for ComfyUI.

ComfyUI imports this file as the custom node package. It only exports the node tables: no model, tensor or file work
happens at import time.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = None
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
