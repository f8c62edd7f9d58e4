"""Attention Edit: localized, text-guided editing of real images for ComfyUI.

ComfyUI imports this file as the custom node package. It only exports the node tables: no model, tensor or file work
happens at import time.
"""

if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # imported as a bare file: pytest does so when the clone's folder name is no Python name ("attention-edit")
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

WEB_DIRECTORY = None
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
