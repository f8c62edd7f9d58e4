"""The pack as ComfyUI and the registry see it: metadata, node schemas, and the architecture's import rules."""

import ast
import glob
import math
import os
import re
import sys

import tomllib
from conftest import HOST

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "README.md")) as _f:
    README = _f.read()
MATH_PACKAGES = {"attention": "hooks.py", "inversion": "comfy_model.py", "masks": "comfy_io.py"}
HOST_MODULES = {"comfy", "nodes", "folder_paths", "server", "execution", "latent_preview", "comfy_extras",
                "comfy_api", "node_helpers"}


def read(path):
    with open(path) as f:
        return f.read()


def package_files(*dirs):
    files = []
    for d in dirs:
        files += glob.glob(os.path.join(ROOT, d, "**", "*.py"), recursive=True)
    return sorted(files)


def imported_modules(path):
    tree = ast.parse(read(path), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def test_pyproject_metadata_and_requirements_in_step():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        meta = tomllib.load(f)
    project, comfy = meta["project"], meta["tool"]["comfy"]
    assert project["name"] == "attention-edit"
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["license"] == {"file": "LICENSE"} and "GNU GENERAL PUBLIC LICENSE" in read(
        os.path.join(ROOT, "LICENSE"))
    assert project["requires-python"]
    assert comfy["PublisherId"] and comfy["DisplayName"] == "Attention Edit"
    icon = comfy["Icon"]  # a published URL, or until then the icon file in the repository
    assert icon.startswith("https://") or os.path.isfile(os.path.join(ROOT, icon)), f"Icon {icon!r} does not exist"
    assert comfy["requires-comfyui"]
    reqs = [line.strip() for line in read(os.path.join(ROOT, "requirements.txt")).splitlines() if line.strip()
            and not line.startswith("#")]
    assert sorted(reqs) == sorted(project["dependencies"]) == ["segment-anything>=1.0"]
    assert "ruff" in meta["tool"] and "pytest" in meta["tool"]


def test_every_node_is_registered_with_a_valid_schema():
    import nodes

    mappings = HOST.pack.NODE_CLASS_MAPPINGS
    assert {"AttnEditInvert", "AttnEditAttentionHook", "AttnEditEditSampler"} <= set(mappings)
    for node_id, cls in mappings.items():
        assert re.fullmatch(r"AttnEdit[A-Z][A-Za-z0-9]+", node_id)
        assert nodes.NODE_CLASS_MAPPINGS[node_id] is cls
        assert HOST.pack.NODE_DISPLAY_NAME_MAPPINGS[node_id]
        spec = cls.INPUT_TYPES()
        assert set(spec) <= {"required", "optional", "hidden"}
        for section in ("required", "optional"):
            for name, entry in spec.get(section, {}).items():
                assert isinstance(entry, tuple) and entry, (node_id, name)
                assert len(entry) > 1 and entry[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert isinstance(cls.RETURN_TYPES, tuple) and callable(getattr(cls, cls.FUNCTION))
        names = getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)
        assert len(names) == len(cls.RETURN_TYPES)
        assert len(getattr(cls, "OUTPUT_TOOLTIPS", ())) == len(cls.RETURN_TYPES), node_id
        assert cls.CATEGORY.startswith("Attention Edit/") and len(cls.DESCRIPTION) > 40
        assert f"(`{node_id}`)" in README, f"{node_id} is missing from the README's node table"


def test_numeric_defaults_lie_in_their_range_and_match_the_function_defaults():
    """A default outside [min, max] is clamped by the frontend (a silently different value); the Python default of
    the node function (headless and API calls) must equal the widget default."""
    import inspect

    for node_id, cls in HOST.pack.NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        params = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
        for section in ("required", "optional"):
            for name, entry in spec.get(section, {}).items():
                if entry[0] not in ("INT", "FLOAT") or "default" not in entry[1]:
                    continue
                opts = entry[1]
                lo, hi = opts.get("min", -math.inf), opts.get("max", math.inf)
                assert lo <= opts["default"] <= hi, (node_id, name, opts)
                if name in params and params[name].default is not inspect.Parameter.empty:
                    assert params[name].default == opts["default"], (node_id, name)


def test_math_packages_reach_comfyui_only_through_their_adapter():
    offenders = []
    for package, adapter in MATH_PACKAGES.items():
        for path in package_files(package):
            if os.path.basename(path) == adapter:
                continue
            bad = set(imported_modules(path)) & HOST_MODULES
            if bad:
                offenders.append(f"{os.path.relpath(path, ROOT)} imports {sorted(bad)}")
    assert not offenders, offenders


def test_no_module_level_assignment_into_comfy_or_torch():
    """Patches go through ModelPatcher registries on clones only: nothing writes attributes of comfy.* / torch.*."""
    offenders = []
    for path in package_files("attention", "inversion", "masks", "nodes") + [os.path.join(ROOT, "__init__.py")]:
        tree = ast.parse(read(path), path)
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, ast.AugAssign | ast.AnnAssign) else []
            for target in targets:
                root = target
                while isinstance(root, ast.Attribute | ast.Subscript):
                    root = root.value
                if isinstance(root, ast.Name) and root.id in {"comfy", "torch", "nodes", "folder_paths"} and \
                        target is not root:
                    offenders.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
        for call in [n for n in ast.walk(tree) if isinstance(n, ast.Call)]:
            if isinstance(call.func, ast.Name) and call.func.id == "setattr" and call.args and \
                    isinstance(call.args[0], ast.Attribute | ast.Name) and ast.unparse(call.args[0]).split(".")[0] \
                    in {"comfy", "torch"}:
                offenders.append(f"{os.path.relpath(path, ROOT)}:{call.lineno} setattr")
    assert not offenders, offenders


def test_package_code_logs_instead_of_printing_and_loads_weights_safely():
    for path in package_files("attention", "inversion", "masks", "nodes"):
        text = read(path)
        assert not re.search(r"^\s*print\(", text, re.M), path
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in m.group(1), path
        assert not re.search(r"(?<![.\w])(eval|exec)\(", text), path
        assert "pip install" not in text or "install hint" in text or "pip install segment-anything" in text, path


def test_import_does_no_work():
    """__init__ only exports the node tables (no tensors, files or models at import time)."""
    tree = ast.parse(read(os.path.join(ROOT, "__init__.py")))
    body = [n for node in tree.body for n in ([node, *node.body, *node.orelse] if isinstance(node, ast.If) else [node])]
    kinds = {type(n).__name__ for n in body}
    assert kinds <= {"Expr", "ImportFrom", "Assign", "If"}


def test_a_clone_in_a_folder_with_a_dash_can_run_the_suite():
    """pytest imports the repository's __init__.py as a bare file when the clone's folder is no Python name
    (`git clone ... attention-edit`); that import must not fail."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("attention-edit", os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=None)  # as pytest: not a package
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.NODE_CLASS_MAPPINGS == {} and module.NODE_DISPLAY_NAME_MAPPINGS == {}


def test_ruff_is_clean():
    import subprocess

    result = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ruff"), "check", ROOT], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout[-3000:]
