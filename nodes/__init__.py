"""UI layer: node classes (schemas and argument plumbing only).

Every module in this package exposes `NODES = {node_id: (class, display_name)}`; they are collected here in a fixed
(alphabetical) order so adding a technique never means editing this file. Node ids are frozen forever.
"""

from __future__ import annotations

import importlib
import pkgutil

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    for _node_id, (_cls, _display) in getattr(_module, "NODES", {}).items():
        if _node_id in NODE_CLASS_MAPPINGS:
            raise RuntimeError(f"node id {_node_id} is defined twice (nodes/{_info.name}.py)")
        NODE_CLASS_MAPPINGS[_node_id] = _cls
        NODE_DISPLAY_NAME_MAPPINGS[_node_id] = _display
