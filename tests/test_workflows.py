"""Every workflow in workflows/ converts from the UI format and runs headless through ComfyUI's executor (tiny model);
the headless runner gives one-line errors for bad arguments."""

import glob
import json
import os
import re

import pytest
import run_workflow
import tiny_models
import workflow_api
import workflow_layout as layout
from conftest import HOST

WORKFLOWS = sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(__file__)), "workflows", "*.json")))


def node_defs():
    import nodes

    return {name: cls.INPUT_TYPES() for name, cls in nodes.NODE_CLASS_MAPPINGS.items()}


def test_there_are_workflows():
    assert len(WORKFLOWS) >= 4


def test_readme_workflow_table_lists_exactly_the_shipped_workflows():
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")) as f:
        readme = f.read()
    table = readme[readme.index("## Workflows"):readme.index("## Troubleshooting")]
    listed = set(re.findall(r"^\| `([0-9]{2}_[a-z0-9_]+\.json)`", table, re.M))
    assert listed == {os.path.basename(p) for p in WORKFLOWS}


def test_workflows_are_generated_from_current_node_definitions():
    import build_workflows

    built = build_workflows.build_all()
    for path in WORKFLOWS:
        name = os.path.splitext(os.path.basename(path))[0]
        assert name in built, f"{name}.json has no definition in tools/workflow_defs"
        with open(path) as f:
            assert _sockets_of_this_host(json.load(f)) == _sockets_of_this_host(json.loads(json.dumps(built[name]))), \
                f"{name}.json is stale: run .venv/bin/python tools/build_workflows.py"


def _sockets_of_this_host(ui: dict) -> dict:
    """Drop unconnected input sockets (not widgets): hosts differ in optional sockets (Apply ControlNet (Advanced)
    has `vae` on current ComfyUI only) and the frontend adds them from the node definition anyway."""
    for n in ui["nodes"]:
        n["inputs"] = [i for i in n["inputs"] if i.get("link") is not None or "widget" in i]
    return ui


def _host_marks(path: str) -> list:
    """Flux workflows run only where Flux exists (ComfyUI 0.3.x); skipped on the 2024 host through newer_host."""
    return [pytest.mark.newer_host("Flux workflows need ComfyUI 0.3.x")] if "_flux_" in os.path.basename(path) else []


@pytest.mark.parametrize("path", [pytest.param(p, id=os.path.basename(p), marks=_host_marks(p)) for p in WORKFLOWS])
def test_workflow_runs_headless_on_the_tiny_model(path, tmp_path):
    with open(path) as f:
        ui = json.load(f)
    assert ui.get("version") == 0.4 and ui["nodes"] and ui["links"] is not None
    assert any(n["type"] in ("Note", "MarkdownNote") for n in ui["nodes"]), "every workflow explains its knobs in a note"
    prompt = workflow_api.ui_to_api(ui, node_defs())
    smoke = run_workflow.resolve_checkpoints(prompt, None)
    assert smoke, "workflows use the placeholder checkpoint, so tests swap in the tiny model"
    run_workflow.stage_image(prompt, None, smoke=True)
    tiny_models.cap_for_smoke(prompt)
    import folder_paths

    folder_paths.set_output_directory(str(tmp_path))
    result = HOST.run(prompt)
    assert result.success, result.error_message
    if any(n["class_type"] == "SaveImage" for n in prompt.values()):
        assert glob.glob(str(tmp_path / "*.png"))


def test_runner_writes_an_image(tmp_path):
    assert run_workflow.main(["--out", str(tmp_path)]) == 0
    assert glob.glob(str(tmp_path / "*.png"))


@pytest.mark.parametrize("argv, message", [
    (["missing.json"], "workflow file not found: missing.json"),
    (["--set", "3.no_such_input=1"], "has no input 'no_such_input'"),
    (["--set", "999.steps=1"], "no node with id or title '999'"),
    (["--set", "3.steps"], "is not of the form NODE.INPUT=VALUE"),
    (["--image", "/nonexistent.png"], "image file not found: /nonexistent.png"),
])
def test_runner_bad_arguments_are_one_line_errors(argv, message, tmp_path, capsys):
    assert run_workflow.main(argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]


def test_changing_only_the_edit_does_not_invert_again(tmp_path):
    """ComfyUI's cache keeps the inversion when only the hook's target prompt changes."""
    with open(os.path.join(os.path.dirname(WORKFLOWS[0]), "02_nulltext_word_swap.json")) as f:
        prompt = workflow_api.ui_to_api(json.load(f), node_defs())
    run_workflow.stage_image(prompt, None, smoke=True)
    run_workflow.resolve_checkpoints(prompt, None)
    tiny_models.cap_for_smoke(prompt)
    invert_id = next(k for k, n in prompt.items() if n["class_type"] == "AttnEditInvert")
    hook_id = next(k for k, n in prompt.items() if n["class_type"] == "AttnEditAttentionHook")
    executor = HOST.new_executor()
    assert HOST.run(prompt, executor).success
    prompt[hook_id]["inputs"]["target_prompt"] = "a photo of a dog sitting on a sofa"
    prompt[hook_id]["inputs"]["local_blend"] = "cat, dog"
    for node in prompt.values():
        if node["class_type"] == "AttnEditAttentionPreview":
            node["inputs"]["words"] = "dog, sofa"
    second = HOST.run(prompt, executor)
    assert second.success, second.error_message
    cached = next(data["nodes"] for event, data in second.messages if event == "execution_cached")
    assert invert_id in cached and hook_id not in cached


# ------------------------------------------------------------------------------------------------ geometry
# The frontend draws a node's title bar above `pos`; image nodes need room for their picture (LoadImage's upload
# preview, output previews after a run). tools/frontend_check.py measures the real frontend against these boxes.
PICTURE_NODES = {"LoadImage", "SaveImage", "PreviewImage", "AttnEditAttentionPreview", "AttnEditInvert"}
MIN_SCALE = 0.6  # below this frontend 1.27 draws nodes without text (its low-quality zoom threshold)


def _load(path):
    with open(path) as f:
        return json.load(f)


def _rects(ui):
    return {f"{n['id']}:{n.get('title', n['type'])}": layout.node_rect(n["pos"], n["size"]) for n in ui["nodes"]}


@pytest.mark.parametrize("path", WORKFLOWS, ids=[os.path.basename(p) for p in WORKFLOWS])
def test_workflow_geometry(path):
    """No two node boxes overlap; picture nodes keep room for the picture; every node is inside exactly one
    group (notes: inside a group or above all of them); groups run left to right without overlapping; the saved
    view shows everything at 1600x1000 clear of the minimap, at a readable scale."""
    ui = _load(path)
    assert layout.overlapping(_rects(ui)) == []
    defs = node_defs()
    for n in ui["nodes"]:
        if n["type"] in PICTURE_NODES:
            import nodes

            spec = defs[n["type"]]
            needed = layout.node_height(spec, nodes.NODE_CLASS_MAPPINGS[n["type"]],
                                        {i["name"] for i in n["inputs"] if i.get("link") is not None})
            assert n["size"][1] >= needed + layout.PREVIEW_HEIGHT, f"{n['type']} has no room for its picture"
    groups = [tuple(g["bounding"]) for g in ui["groups"]]
    assert len(groups) >= 3 and all(g.get("title") and g.get("color") for g in ui["groups"])
    assert [g[0] for g in groups] == sorted(g[0] for g in groups)
    assert layout.overlapping({str(i): g for i, g in enumerate(groups)}) == []
    top = min(g[1] for g in groups)
    for n in ui["nodes"]:
        rect = layout.node_rect(n["pos"], n["size"])
        inside = [g for g in groups if layout.contains(g, rect)]
        if n["type"] in ("Note", "MarkdownNote") and not inside:
            assert rect[1] + rect[3] <= top, f"note {n.get('title')} overlaps the groups"
            left, right = min(g[0] for g in groups), max(g[0] + g[2] for g in groups)
            assert left <= rect[0] and rect[0] + rect[2] <= right, f"note {n.get('title')} is wider than the graph"
        else:
            assert len(inside) == 1, f"{n['type']} (node {n['id']}) is not inside exactly one group"
    view = ui["extra"]["ds"]
    assert view["scale"] >= MIN_SCALE
    x0, y0, x1, y1 = layout.visible_rect(view)
    rects = list(_rects(ui).values()) + groups
    gx0, gy0 = min(r[0] for r in rects), min(r[1] for r in rects)
    gx1, gy1 = max(r[0] + r[2] for r in rects), max(r[1] + r[3] for r in rects)
    assert x0 <= gx0 and y0 <= gy0 and gx1 <= x1 and gy1 <= y1, "the saved view crops the graph"
    s, (ox, oy) = view["scale"], view["offset"]
    clear_of_minimap = (gy1 + oy) * s <= layout.MINIMAP_TOP or (gx1 + ox) * s <= layout.MINIMAP_LEFT
    assert clear_of_minimap, "the minimap covers part of the graph"


def test_geometry_check_catches_overlaps_and_cropping():
    """The geometry test's helpers flag what the old layout did (Load Image's picture over the node below it, a
    view that crops the right-hand column)."""
    assert layout.overlapping({"a": (0, 0, 340, 500), "b": (0, 400, 340, 100)}) == [("a", "b")]
    assert layout.overlapping({"a": (0, 0, 340, 100), "b": (0, 130, 340, 100)}) == []
    x0, y0, x1, y1 = layout.visible_rect({"scale": 0.8, "offset": [40, 320]})
    assert x1 < 1600 + 400  # the old saved view ended left of the old graph's last column
    assert layout.fit_view((0, 0, 3000, 900))["scale"] < layout.fit_view((0, 0, 1500, 900))["scale"]


def test_no_deprecated_core_nodes():
    """Every node type in every workflow is current on the host (no DEPRECATED flag, e.g. Apply ControlNet (OLD))."""
    import nodes

    for path in WORKFLOWS:
        for n in _load(path)["nodes"]:
            cls = nodes.NODE_CLASS_MAPPINGS.get(n["type"])
            assert cls is None or not getattr(cls, "DEPRECATED", False), f"{os.path.basename(path)}: {n['type']}"
            assert n["type"] != "ControlNetApply", f"{os.path.basename(path)} uses Apply ControlNet (OLD)"


def test_every_workflow_has_an_honest_template_thumbnail():
    """ComfyUI's template browser asks for <name>.jpg next to each workflow; it shows the example input, the mask box
    the workflow draws and the edit it asks for (read from the workflow, never a result)."""
    import thumbnails
    from PIL import Image

    for path in WORKFLOWS:
        thumb = os.path.splitext(path)[0] + ".jpg"
        assert os.path.isfile(thumb), f"{os.path.basename(thumb)} missing: run tools/build_workflows.py"
        with Image.open(thumb) as im:
            assert im.format == "JPEG" and im.size == thumbnails.SIZE
    folder = os.path.dirname(WORKFLOWS[0])
    assert thumbnails.edit_text(_load(os.path.join(folder, "02_nulltext_word_swap.json"))) == "cat  ->  tiger"
    assert thumbnails.edit_text(_load(os.path.join(folder, "08_cpam_object_removal.json"))) == \
        "removes the masked object"
    x, y, w, h = thumbnails.mask_box(_load(os.path.join(folder, "07_mag_edit.json")))
    assert min(x, y, w, h) > 0 and x + w <= 1 and y + h <= 1  # fractions of the mask canvas
    assert thumbnails.mask_box(_load(os.path.join(folder, "02_nulltext_word_swap.json"))) is None
    for path in WORKFLOWS:  # the read-me heading, not a stage note or Markdown syntax
        name = os.path.splitext(os.path.basename(path))[0]
        title = thumbnails.title_of(name, _load(path))
        assert title.startswith(name[:2] + "  ") and "#" not in title and len(title) > 6, title
