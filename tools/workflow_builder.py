"""Write UI-format workflow JSON (as the ComfyUI frontend saves it) from a compact Python description.

Used by tools/build_workflows.py to (re)generate workflows/*.json from the node definitions, so saved workflows
always match the nodes' current inputs. Needs a booted host (tools/comfy_host.py) for INPUT_TYPES / RETURN_TYPES.

    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name="v1-5-pruned-emaonly.safetensors")
    enc = g.node("CLIPTextEncode", text="a cat", clip=ckpt["CLIP"])
    g.note("What the knobs do ...")
    g.save("workflows/01_example.json")
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from workflow_api import widget_names

NODE_WIDTH, COLUMN_GAP, ROW_GAP = 340, 60, 40


@dataclass
class Output:
    node: Node
    slot: int


@dataclass
class Node:
    id: int
    type: str
    values: dict[str, Any]
    links: dict[str, Output]
    title: str | None = None
    column: int = 0
    extra_height: int = 0
    outputs: list[str] = field(default_factory=list)

    def __getitem__(self, key: str | int) -> Output:
        if isinstance(key, int):
            return Output(self, key)
        from nodes import NODE_CLASS_MAPPINGS

        cls = NODE_CLASS_MAPPINGS[self.type]
        names = list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES)
        types = list(cls.RETURN_TYPES)
        if key in names:
            return Output(self, names.index(key))
        if key in types:
            return Output(self, types.index(key))
        raise KeyError(f"{self.type} has no output {key!r} (outputs: {names})")


class Graph:
    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.notes: list[tuple[str, str]] = []

    def node(self, type_: str, title: str | None = None, **inputs) -> Node:
        values = {k: v for k, v in inputs.items() if not isinstance(v, Output)}
        links = {k: v for k, v in inputs.items() if isinstance(v, Output)}
        column = 1 + max((o.node.column for o in links.values()), default=-1)
        n = Node(len(self.nodes) + 1, type_, values, links, title, column)
        self.nodes.append(n)
        return n

    def note(self, text: str, title: str = "Read me") -> None:
        self.notes.append((title, text))

    # ------------------------------------------------------------------------------------------------ serialise
    def to_ui(self) -> dict:
        from nodes import NODE_CLASS_MAPPINGS

        links, ui_nodes, link_id = [], [], 0
        out_links: dict[tuple[int, int], list[int]] = {}
        rows: dict[int, int] = {}
        order = sorted(self.nodes, key=lambda n: (n.column, n.id))
        for position, n in enumerate(order):
            cls = NODE_CLASS_MAPPINGS[n.type]
            spec = cls.INPUT_TYPES()
            inputs, widgets = self._inputs(n, spec, links, out_links)
            link_id = len(links)
            height = 80 + 26 * (len(inputs) + len(widgets)) + n.extra_height
            y = rows.get(n.column, 0)
            rows[n.column] = y + height + ROW_GAP
            names = list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES)
            outputs = [{"name": name, "type": t, "links": None, "slot_index": i}
                       for i, (name, t) in enumerate(zip(names, cls.RETURN_TYPES))]
            entry = {"id": n.id, "type": n.type, "pos": [n.column * (NODE_WIDTH + COLUMN_GAP), y],
                     "size": [NODE_WIDTH, height], "flags": {}, "order": position, "mode": 0,
                     "inputs": inputs, "outputs": outputs, "properties": {"Node name for S&R": n.type},
                     "widgets_values": widgets}
            if n.title:
                entry["title"] = n.title
            ui_nodes.append(entry)
        by_id = {e["id"]: e for e in ui_nodes}
        for (origin, slot), ids in out_links.items():
            by_id[origin]["outputs"][slot]["links"] = ids
        next_id = len(self.nodes) + 1
        for k, (title, text) in enumerate(self.notes):
            ui_nodes.append({"id": next_id + k, "type": "Note", "pos": [0, -260 - 300 * k], "size": [720, 220],
                             "flags": {}, "order": len(ui_nodes), "mode": 0, "inputs": [], "outputs": [],
                             "title": title, "properties": {"text": ""}, "widgets_values": [text],
                             "color": "#432", "bgcolor": "#653"})
        return {"last_node_id": next_id + len(self.notes) - 1, "last_link_id": link_id, "nodes": ui_nodes,
                "links": links, "groups": [], "config": {},
                "extra": {"ds": {"scale": 0.8, "offset": [40, 320]}}, "version": 0.4}

    def _inputs(self, n: Node, spec: dict, links: list, out_links: dict):
        widgets_spec = widget_names(spec)
        widget_set = {name for name, _, _ in widgets_spec}
        inputs = []
        for section in ("required", "optional"):
            for name, s in spec.get(section, {}).items():
                kind = s[0] if isinstance(s, list | tuple) else s
                type_name = "COMBO" if isinstance(kind, list | tuple) else kind
                if name in widget_set and name not in n.links:
                    continue
                entry = {"name": name, "type": type_name, "link": None}
                if name in widget_set:
                    entry["widget"] = {"name": name}
                if name in n.links:
                    out = n.links[name]
                    link_id = len(links) + 1
                    out_type = _output_type(out)
                    links.append([link_id, out.node.id, out.slot, n.id, len(inputs), out_type])
                    out_links.setdefault((out.node.id, out.slot), []).append(link_id)
                    entry["link"] = link_id
                elif section == "required":
                    raise ValueError(f"{n.type}: required input {name!r} is not connected")
                inputs.append(entry)
        unknown = set(n.values) - widget_set
        if unknown:
            raise ValueError(f"{n.type}: unknown widget inputs {sorted(unknown)}")
        widgets = []
        for name, options, control in widgets_spec:
            kind_default = options.get("default")
            value = n.values.get(name, kind_default)
            if value is None:
                combo = _combo(spec, name)
                value = combo[0] if combo else ""
            widgets.append(value)
            if control:
                widgets.append("fixed")
            if options.get("image_upload"):
                widgets.append("image")
        return inputs, widgets

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_ui(), f, indent=1)
            f.write("\n")


def _combo(spec: dict, name: str):
    for section in ("required", "optional"):
        s = spec.get(section, {}).get(name)
        if s is not None and isinstance(s[0], list | tuple):
            return list(s[0])
    return None


def _output_type(out: Output) -> str:
    from nodes import NODE_CLASS_MAPPINGS

    return NODE_CLASS_MAPPINGS[out.node.type].RETURN_TYPES[out.slot]
