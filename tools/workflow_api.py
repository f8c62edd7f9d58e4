"""ComfyUI workflow JSON: UI format (what the frontend saves) -> API format (what the executor runs).

Follows the frontend's graphToPrompt rules: muted (mode 2) and bypassed (mode 4) nodes are skipped, bypassed nodes
forward their first input of the matching type, virtual nodes are resolved (Reroute -> its source, PrimitiveNode ->
the value already stored in the target's widgets_values, Note/MarkdownNote dropped); widget values are zipped with
the node's INPUT_TYPES widget order, skipping the values of non-serialised widgets (control_after_generate after
seeds, the upload button of image inputs). Both UI format versions are read: 0.4 (links as lists) and 1.0 (links as
objects). Developer tooling; importing it needs no ComfyUI.
"""

from __future__ import annotations

from typing import Any

VIRTUAL = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
SEED_NAMES = {"seed", "noise_seed"}


class WorkflowError(ValueError):
    """A workflow that cannot be converted (unknown node type, broken link)."""


def is_api_format(data: dict) -> bool:
    return isinstance(data, dict) and "nodes" not in data and all(
        isinstance(v, dict) and "class_type" in v for v in data.values())


def widget_names(input_types: dict) -> list[tuple[str, dict, bool]]:
    """[(name, options, has_control_value)] of an INPUT_TYPES dict's widget inputs, in frontend order."""
    out = []
    for section in ("required", "optional"):
        for name, spec in input_types.get(section, {}).items():
            kind = spec[0] if isinstance(spec, list | tuple) else spec
            options = spec[1] if isinstance(spec, list | tuple) and len(spec) > 1 and isinstance(spec[1], dict) \
                else {}
            is_widget = isinstance(kind, list | tuple) or (kind in WIDGET_TYPES and not options.get("forceInput"))
            if is_widget:
                control = kind == "INT" and (name in SEED_NAMES or options.get("control_after_generate"))
                out.append((name, options, bool(control)))
    return out


def _links(workflow: dict) -> dict[int, tuple[int, int, int, int]]:
    """link id -> (origin id, origin slot, target id, target slot)."""
    out = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):
            out[int(link["id"])] = (int(link["origin_id"]), int(link["origin_slot"]), int(link["target_id"]),
                                    int(link["target_slot"]))
        else:
            out[int(link[0])] = (int(link[1]), int(link[2]), int(link[3]), int(link[4]))
    return out


def _resolve(origin: int, slot: int, nodes: dict[int, dict], links: dict, want_type: str | None):
    """Follow Reroutes and bypassed nodes to the real source (node id, slot), or None for a PrimitiveNode."""
    seen = set()
    while True:
        node = nodes.get(origin)
        if node is None:
            raise WorkflowError(f"link from missing node {origin}")
        if (origin, slot) in seen:
            raise WorkflowError(f"link cycle through node {origin}")
        seen.add((origin, slot))
        if node["type"] == "PrimitiveNode":
            return None
        if node["type"] == "Reroute" or node.get("mode") == 4:
            candidates = node.get("inputs") or []
            if node.get("mode") == 4 and want_type is not None:
                typed = [i for i in candidates if i.get("type") == want_type and i.get("link") is not None]
                candidates = typed or candidates
            link_id = next((i.get("link") for i in candidates if i.get("link") is not None), None)
            if link_id is None:
                raise WorkflowError(f"node {origin} ({node['type']}) is bypassed or a reroute with no input")
            origin, slot = links[int(link_id)][0], links[int(link_id)][1]
            continue
        return origin, slot


def _widget_values(node: dict, input_types: dict, linked: set[str]) -> dict[str, Any]:
    values = list(node.get("widgets_values") or [])
    if isinstance(node.get("widgets_values"), dict):  # some frontends save a name -> value dict
        return {k: v for k, v in node["widgets_values"].items() if k not in linked}
    out, i = {}, 0
    for name, options, control in widget_names(input_types):
        if i >= len(values):
            break
        if name not in linked:
            out[name] = values[i]
        i += 1
        if control:
            i += 1  # the control_after_generate value ("fixed"/"randomize") is not an input
        if options.get("image_upload") or options.get("video_upload"):
            i += 1 if i < len(values) and values[i] in ("image", "video", "upload") else 0
    return out


def ui_to_api(workflow: dict, node_defs: dict[str, dict]) -> dict[str, dict]:
    """Convert a UI-format workflow to an API-format prompt. node_defs: class_type -> INPUT_TYPES()."""
    if is_api_format(workflow):
        return workflow
    nodes = {int(n["id"]): n for n in workflow.get("nodes", [])}
    links = _links(workflow)
    prompt: dict[str, dict] = {}
    for node_id, node in sorted(nodes.items()):
        if node["type"] in VIRTUAL or node.get("mode") in (2, 4):
            continue
        if node["type"] not in node_defs:
            raise WorkflowError(f"node {node_id} has type {node['type']!r}, which is not installed")
        inputs: dict[str, Any] = {}
        linked = set()
        for inp in node.get("inputs") or []:
            if inp.get("link") is None:
                continue
            origin, slot = links[int(inp["link"])][0], links[int(inp["link"])][1]
            source = _resolve(origin, slot, nodes, links, inp.get("type"))
            if source is None:  # PrimitiveNode: its value is kept in this node's widgets_values
                continue
            inputs[inp["name"]] = [str(source[0]), int(source[1])]
            linked.add(inp["name"])
        inputs.update(_widget_values(node, node_defs[node["type"]], linked))
        entry = {"class_type": node["type"], "inputs": inputs}
        if node.get("title"):
            entry["_meta"] = {"title": node["title"]}
        prompt[str(node_id)] = entry
    return prompt
