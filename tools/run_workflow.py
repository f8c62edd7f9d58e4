"""Headless workflow runner: executes a ComfyUI workflow JSON through ComfyUI's real executor with this pack loaded.

    scripts/run.sh [WORKFLOW.json] [--image FILE] [--checkpoint NAME_OR_PATH] [--seed N]
                   [--source-prompt TEXT] [--target-prompt TEXT] [--set NODE.INPUT=VALUE ...] [--out DIR]

WORKFLOW is a UI-format file saved by the ComfyUI frontend or an API-format prompt (default: the null-text word swap
example). Checkpoints are found through ComfyUI's folder_paths (models/checkpoints and extra_model_paths.yaml) or as
an explicit path. Without any checkpoint the default workflow runs a DEMO EDIT on the shipped demo model (synthetic
shapes world, models/demo): "a red circle on a gray background" -> "a blue circle on a gray background" on
workflows/assets/demo_red_circle.png, in seconds on a CPU (how recognisable the edit is depends on how far the shipped
weights were trained: docs/demo_model.md). Other workflows without a checkpoint run end to end
on a built-in tiny random model: a SMOKE RUN that exercises every node, whose pictures are noise (adapter loaders,
ControlNetLoader, then load a tiny random T2I-Adapter). With a real checkpoint, adapters are found in models/controlnet. Images from SaveImage nodes are written to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import comfy_host  # noqa: E402
import workflow_api  # noqa: E402

DEFAULT_WORKFLOW = os.path.join(comfy_host.REPO_ROOT, "workflows", "02_nulltext_word_swap.json")
DEFAULT_IMAGE = os.path.join(comfy_host.REPO_ROOT, "workflows", "assets", "attention_edit_example.jpg")
CHECKPOINT_LOADERS = {"CheckpointLoaderSimple"}
TINY_LOADER = "AttnEditTestTinyCheckpoint"
SAM_NODES = {"AttnEditSAMMask"}  # nodes whose `sam_model` names a file in models/sams
ADAPTER_LOADERS = {"ControlNetLoader"}
TINY_ADAPTER_LOADER = "AttnEditTestTinyAdapter"
DEMO_LOADER = "AttnEditDemoModel"
DEMO_WEIGHTS = os.path.join(comfy_host.REPO_ROOT, "models", "demo", "attnedit_demo.safetensors")
DEMO_IMAGE = os.path.join(comfy_host.REPO_ROOT, "workflows", "assets", "demo_red_circle.png")
DEMO_SOURCE = "a red circle on a gray background"
DEMO_TARGET = "a blue circle on a gray background"
DEMO_WORDS = "circle"  # local blend and heat-map words of the demo edit
DEMO_CAPS = {"steps": 20, "inner_steps": 5}  # the demo model at 128 px: a few seconds on a CPU


class RunnerError(Exception):
    """A bad argument or input: reported as one line, exit status 2."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/run.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("workflow", nargs="?", default=DEFAULT_WORKFLOW, help="workflow JSON (UI or API format)")
    p.add_argument("--image", help="image file for every LoadImage node (default: the bundled example)")
    p.add_argument("--checkpoint", help="checkpoint name in models/checkpoints, or a path to a .safetensors/.ckpt")
    p.add_argument("--seed", type=int, help="value for every seed / noise_seed input")
    p.add_argument("--source-prompt", help="value for every source_prompt input")
    p.add_argument("--target-prompt", help="value for every target_prompt input")
    p.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                   help="override one input; NODE is the node id or title, VALUE is parsed as JSON when possible")
    p.add_argument("--extra-model-paths", help="an extra_model_paths.yaml to register (as ComfyUI's --extra-model-paths-config)")
    p.add_argument("--out", default="out", help="folder for the output images (default: ./out)")
    return p.parse_args(argv)


def load_workflow(path: str) -> dict:
    if not os.path.isfile(path):
        raise RunnerError(f"workflow file not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise RunnerError(f"workflow {path} is not valid JSON: {err}") from None


def to_api(workflow: dict) -> dict:
    import nodes

    defs = {name: cls.INPUT_TYPES() for name, cls in nodes.NODE_CLASS_MAPPINGS.items()}
    try:
        return workflow_api.ui_to_api(workflow, defs)
    except workflow_api.WorkflowError as err:
        raise RunnerError(f"cannot read the workflow: {err}") from None


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_set(prompt: dict, spec: str) -> None:
    """--set NODE.INPUT=VALUE, NODE = id or title; the input must exist on that node (widget or linked)."""
    target, sep, value = spec.partition("=")
    node_key, dot, name = target.rpartition(".")
    if not sep or not dot:
        raise RunnerError(f"--set {spec!r} is not of the form NODE.INPUT=VALUE")
    matches = [nid for nid, n in prompt.items() if nid == node_key or n.get("_meta", {}).get("title") == node_key]
    if not matches:
        raise RunnerError(f"--set {spec!r}: no node with id or title {node_key!r} (ids: {', '.join(prompt)})")
    import nodes

    for nid in matches:
        node = prompt[nid]
        spec_inputs = nodes.NODE_CLASS_MAPPINGS[node["class_type"]].INPUT_TYPES()
        known = {**spec_inputs.get("required", {}), **spec_inputs.get("optional", {})}
        if name not in known:
            raise RunnerError(f"--set {spec!r}: {node['class_type']} (node {nid}) has no input {name!r}; its inputs "
                              f"are {', '.join(known)}")
        node["inputs"][name] = _parse_value(value)


def set_everywhere(prompt: dict, names: set[str], value) -> int:
    count = 0
    for node in prompt.values():
        for name in names:
            if name in node["inputs"] and not isinstance(node["inputs"][name], list):
                node["inputs"][name] = value
                count += 1
    return count


def register_extra_model_paths(path: str) -> None:
    """The same yaml schema ComfyUI reads: {name: {base_path, checkpoints: "a\\nb", ...}}."""
    import folder_paths
    import yaml

    if not os.path.isfile(path):
        raise RunnerError(f"--extra-model-paths file not found: {path}")
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    for conf in config.values():
        if not isinstance(conf, dict):
            continue
        base = os.path.expanduser(conf.get("base_path", ""))
        for kind, paths in conf.items():
            if kind in ("base_path", "is_default"):
                continue
            for entry in str(paths).split("\n"):
                if entry.strip():
                    folder_paths.add_model_folder_path(kind, os.path.join(base, entry.strip()))


def resolve_checkpoints(prompt: dict, checkpoint: str | None) -> list[str]:
    """Point every checkpoint loader at an available checkpoint; swap in the tiny model when none exists (and then the
    tiny T2I-Adapter for every adapter loader). Returns the ids of the swapped nodes."""
    import folder_paths

    if checkpoint and os.path.isfile(checkpoint):
        folder_paths.add_model_folder_path("checkpoints", os.path.dirname(os.path.abspath(checkpoint)))
        checkpoint = os.path.basename(checkpoint)
    available = folder_paths.get_filename_list("checkpoints")
    if checkpoint and checkpoint not in available:
        raise RunnerError(f"--checkpoint {checkpoint!r} not found in {folder_paths.get_folder_paths('checkpoints')}")
    smoke = []
    for nid, node in prompt.items():
        if node["class_type"] not in CHECKPOINT_LOADERS:
            continue
        wanted = checkpoint or node["inputs"].get("ckpt_name")
        if wanted in available:
            node["inputs"]["ckpt_name"] = wanted
        elif available and not checkpoint and len(available) == 1:
            node["inputs"]["ckpt_name"] = available[0]
        else:
            node["class_type"], node["inputs"] = TINY_LOADER, {"ckpt_name": str(wanted)}
            smoke.append(nid)
    if smoke:
        smoke += resolve_sam_models(prompt)
    return smoke + resolve_adapters(prompt, tiny=bool(smoke))


def resolve_adapters(prompt: dict, tiny: bool) -> list[str]:
    """Adapter loaders (ControlNetLoader, e.g. T2I-Adapters): on the tiny model each becomes the tiny random T2I-Adapter
    (a real adapter cannot run on it); with a real checkpoint the named file must be in models/controlnet."""
    import folder_paths

    swapped = []
    for nid, node in prompt.items():
        if node["class_type"] not in ADAPTER_LOADERS:
            continue
        name = node["inputs"].get("control_net_name")
        if tiny:
            node["class_type"], node["inputs"] = TINY_ADAPTER_LOADER, {"control_net_name": str(name)}
            swapped.append(nid)
            continue
        available = folder_paths.get_filename_list("controlnet")
        if name not in available:
            raise RunnerError(f"node {nid} (ControlNetLoader) needs {name!r}, which is not in "
                              f"{folder_paths.get_folder_paths('controlnet')}; put the adapter there or pick one with "
                              f"--set {nid}.control_net_name=NAME (available: {', '.join(available) or 'none'})")
    return swapped


def resolve_sam_models(prompt: dict) -> list[str]:
    """Smoke runs only: SAM nodes whose checkpoint is not installed get a tiny random SAM written to a temp folder."""
    import folder_paths
    import tiny_models

    try:
        available = folder_paths.get_filename_list("sams")
    except KeyError:  # nothing registered the folder yet
        available = []
    swapped = []
    for nid, node in prompt.items():
        if node["class_type"] in SAM_NODES and node["inputs"].get("sam_model") not in available:
            node["inputs"]["sam_model"] = tiny_models.register_tiny_sam()
            swapped.append(nid)
    return swapped


def wants_demo(args: argparse.Namespace) -> bool:
    """The default workflow with no checkpoint anywhere and the shipped demo weights present."""
    import folder_paths

    return (not args.checkpoint and os.path.abspath(args.workflow) == DEFAULT_WORKFLOW
            and not folder_paths.get_filename_list("checkpoints") and os.path.isfile(DEMO_WEIGHTS))


def use_demo_model(prompt: dict, args: argparse.Namespace) -> list[str]:
    """Point the workflow at the demo model: loaders, prompts (unless given), local blend / heat-map words, step caps.
    Returns the ids of the swapped loaders."""
    swapped = []
    for nid, node in prompt.items():
        inputs = node["inputs"]
        if node["class_type"] in CHECKPOINT_LOADERS:
            node["class_type"], node["inputs"] = DEMO_LOADER, {"weights": os.path.basename(DEMO_WEIGHTS)}
            swapped.append(nid)
            continue
        if args.source_prompt is None and isinstance(inputs.get("source_prompt"), str):
            inputs["source_prompt"] = DEMO_SOURCE
        if args.target_prompt is None and isinstance(inputs.get("target_prompt"), str):
            inputs["target_prompt"] = DEMO_TARGET
        if isinstance(inputs.get("local_blend"), str) and inputs["local_blend"]:
            inputs["local_blend"] = DEMO_WORDS
        if node["class_type"] == "AttnEditAttentionPreview":
            inputs["words"] = DEMO_WORDS
        for name, cap in DEMO_CAPS.items():
            if isinstance(inputs.get(name), int) and inputs[name] > cap:
                inputs[name] = cap
    return swapped


def stage_image(prompt: dict, image: str | None, smoke: bool) -> None:
    import folder_paths
    import tiny_models

    loaders = [n for n in prompt.values() if n["class_type"] == "LoadImage"]
    if not loaders:
        if image:
            raise RunnerError("--image given but the workflow has no LoadImage node")
        return
    source = image or DEFAULT_IMAGE
    if not os.path.isfile(source):
        raise RunnerError(f"image file not found: {source}")
    name = "attnedit_input_" + os.path.basename(source)
    target = os.path.join(folder_paths.get_input_directory(), name)
    if smoke:
        name = os.path.splitext(name)[0] + "_smoke.png"
        tiny_models.write_smoke_image(source, os.path.join(folder_paths.get_input_directory(), name))
    else:
        shutil.copyfile(source, target)
    for node in loaders:
        node["inputs"]["image"] = name


def run(args: argparse.Namespace) -> int:
    host = comfy_host.boot()
    import folder_paths
    import tiny_models

    host.register(tiny_models.TEST_NODES)
    out_dir = os.path.abspath(args.out)
    os.makedirs(out_dir, exist_ok=True)
    folder_paths.set_output_directory(out_dir)
    if args.extra_model_paths:
        register_extra_model_paths(args.extra_model_paths)
    prompt = to_api(load_workflow(args.workflow))
    if args.seed is not None:
        set_everywhere(prompt, {"seed", "noise_seed"}, args.seed)
    for flag, name in ((args.source_prompt, "source_prompt"), (args.target_prompt, "target_prompt")):
        if flag is not None and not set_everywhere(prompt, {name}, flag):
            raise RunnerError(f"--{name.replace('_', '-')} given but no node of the workflow has a {name} input")
    for spec in args.set:
        apply_set(prompt, spec)
    demo = use_demo_model(prompt, args) if wants_demo(args) else []
    smoke = [] if demo else resolve_checkpoints(prompt, args.checkpoint)
    stage_image(prompt, args.image or (DEMO_IMAGE if demo else None), bool(smoke))
    if demo:
        print("=" * 78, file=sys.stderr)
        print(f"DEMO RUN: no checkpoint found; loader node(s) {', '.join(demo)} now load the shipped DEMO MODEL (a tiny model of a "
              f"synthetic shapes world, models/demo) and edit {os.path.relpath(args.image or DEMO_IMAGE)}:\n"
              f"  '{args.source_prompt or DEMO_SOURCE}' -> '{args.target_prompt or DEMO_TARGET}' (128 px, steps "
              f"capped at {DEMO_CAPS['steps']}).\nIt only knows coloured circles/squares/triangles on gray/white/black. "
              f"For photos put an SD1.5 checkpoint in {folder_paths.get_folder_paths('checkpoints')[0]} or pass "
              "--checkpoint PATH.", file=sys.stderr)
        print("=" * 78, file=sys.stderr)
    if smoke:
        lowered = tiny_models.cap_for_smoke(prompt)
        print("=" * 78, file=sys.stderr)
        print("SMOKE RUN: no checkpoint found; nodes " + ", ".join(smoke) + " use the built-in TINY RANDOM model.\n"
              "Every node runs for real, but the pictures are NOISE. The image is scaled to "
              f"{tiny_models.SMOKE_IMAGE_SIZE} px and these inputs were lowered to keep it quick on a CPU: "
              f"{', '.join(lowered) or 'none'}.\nPut an SD1.5 checkpoint in "
              f"{folder_paths.get_folder_paths('checkpoints')[0]} or pass --checkpoint PATH.", file=sys.stderr)
        print("=" * 78, file=sys.stderr)
    started = time.time()
    try:
        result = host.run(prompt)
    except ValueError as err:
        raise RunnerError(str(err).splitlines()[0]) from None
    if not result.success:
        print(f"error: {result.error_message.strip().splitlines()[0] if result.error_message else 'failed'}",
              file=sys.stderr)
        return 1
    written = sorted(os.path.join(out_dir, f) for f in os.listdir(out_dir) if f.endswith(".png"))
    fresh = [f for f in written if os.path.getmtime(f) >= started - 1]
    for path in fresh:
        print(path)
    print(f"done in {time.time() - started:.1f}s: {len(fresh)} image(s) in {out_dir}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except (RunnerError, comfy_host.HostError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
