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
            assert json.load(f) == json.loads(json.dumps(built[name])), \
                f"{name}.json is stale: run .venv/bin/python tools/build_workflows.py"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[os.path.basename(p) for p in WORKFLOWS])
def test_workflow_runs_headless_on_the_tiny_model(path, tmp_path):
    with open(path) as f:
        ui = json.load(f)
    assert ui.get("version") == 0.4 and ui["nodes"] and ui["links"] is not None
    assert any(n["type"] == "Note" for n in ui["nodes"]), "every workflow explains its knobs in a Note"
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
