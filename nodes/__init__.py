"""UI layer: node classes (schemas and argument plumbing only). Each module exposes NODES = {id: (class, display)}."""

from __future__ import annotations

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
