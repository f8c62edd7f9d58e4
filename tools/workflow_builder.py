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

import workflow_layout as layout
from workflow_api import widget_names


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
    stage: str | None = None
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
        self.notes: list[tuple[str, str, str | None]] = []
        self.stage_titles: dict[str, str] = {}

    def node(self, type_: str, title: str | None = None, stage: str | None = None, **inputs) -> Node:
        """Add a node; `stage` (one of layout.STAGES) overrides the group it is drawn in."""
        values = {k: v for k, v in inputs.items() if not isinstance(v, Output)}
        links = {k: v for k, v in inputs.items() if isinstance(v, Output)}
        n = Node(len(self.nodes) + 1, type_, values, links, title, stage)
        self.nodes.append(n)
        return n

    def note(self, text: str, title: str = "Read me", stage: str | None = None) -> None:
        """A Note: with `stage`, at the top of that stage's group; without, across the top of the whole graph."""
        self.notes.append((title, text, stage))

    def title_stage(self, stage: str, title: str) -> None:
        """Rename a stage's group for this workflow (e.g. "Regenerate" instead of "Edit")."""
        self.stage_titles[stage] = title

    # ------------------------------------------------------------------------------------------------ serialise
    def to_ui(self) -> dict:
        from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

        links, ui_nodes = [], []
        out_links: dict[tuple[int, int], list[int]] = {}
        boxes = []
        for n in self.nodes:
            cls = NODE_CLASS_MAPPINGS[n.type]
            spec = cls.INPUT_TYPES()
            inputs, widgets = self._inputs(n, spec, links, out_links)
            names = list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES)
            outputs = [{"name": name, "type": t, "links": None, "slot_index": i}
                       for i, (name, t) in enumerate(zip(names, cls.RETURN_TYPES))]
            entry = {"id": n.id, "type": n.type, "pos": [0, 0], "size": [0, 0], "flags": {}, "order": 0, "mode": 0,
                     "inputs": inputs, "outputs": outputs, "properties": {"Node name for S&R": n.type},
                     "widgets_values": widgets}
            if n.title:
                entry["title"] = n.title
            ui_nodes.append(entry)
            boxes.append(layout.NodeBox(
                id=n.id, type=n.type, inputs=tuple(o.node.id for o in n.links.values()), stage=n.stage,
                width=layout.node_width(n.title or NODE_DISPLAY_NAME_MAPPINGS.get(n.type) or n.type),
                height=layout.node_height(spec, cls, linked=set(n.links),
                                          optional_sockets=n.type.startswith("AttnEdit")), preview=layout.shows_image(n.type, spec, cls)))
        by_id = {e["id"]: e for e in ui_nodes}
        for (origin, slot), ids in out_links.items():
            by_id[origin]["outputs"][slot]["links"] = ids
        next_id = len(self.nodes) + 1
        notes = [layout.NoteBox(next_id + k, title, text, stage) for k, (title, text, stage) in enumerate(self.notes)]
        placed = layout.arrange(boxes, notes, self.stage_titles)
        for order, node_id in enumerate(placed.order):
            by_id[node_id]["order"] = order
        for e in ui_nodes:
            e["pos"], e["size"] = placed.pos[e["id"]], placed.size[e["id"]]
        for k, note in enumerate(notes):
            ui_nodes.append({"id": note.id, "type": "MarkdownNote", "pos": placed.pos[note.id], "size": placed.size[note.id],
                             "flags": {}, "order": len(self.nodes) + k, "mode": 0, "inputs": [], "outputs": [],
                             "title": note.title, "properties": {"text": ""}, "widgets_values": [layout.markdown(note.text, heading=note.stage is None)],
                             "color": layout.NOTE_COLOR, "bgcolor": layout.NOTE_BGCOLOR})
        return {"last_node_id": next_id + len(self.notes) - 1, "last_link_id": len(links), "nodes": ui_nodes,
                "links": links, "groups": placed.groups, "config": {},
                "extra": {"ds": placed.view}, "version": 0.4}

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
