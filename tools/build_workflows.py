"""Regenerate workflows/*.json from tools/workflow_defs (run: .venv/bin/python tools/build_workflows.py [--check]).

--check exits 1 when a committed workflow differs from what the current node definitions generate.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import comfy_host  # noqa: E402

WORKFLOW_DIR = os.path.join(comfy_host.REPO_ROOT, "workflows")


def definitions() -> dict:
    import workflow_defs

    out = {}
    for info in sorted(pkgutil.iter_modules(workflow_defs.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"workflow_defs.{info.name}")
        out.update(getattr(module, "WORKFLOWS", {}))
    return out


def build_all() -> dict[str, dict]:
    from workflow_builder import Graph

    built = {}
    for name, build in definitions().items():
        g = Graph()
        build(g)
        built[name] = g.to_ui()
    return built


def main(argv: list[str]) -> int:
    comfy_host.boot()
    stale = []
    built = build_all()
    for name, ui in built.items():
        path = os.path.join(WORKFLOW_DIR, f"{name}.json")
        text = json.dumps(ui, indent=1) + "\n"
        if "--check" in argv:
            with open(path) if os.path.exists(path) else open(os.devnull) as f:
                if f.read() != text:
                    stale.append(name)
            continue
        with open(path, "w") as f:
            f.write(text)
        print("wrote", path)
    if "--check" not in argv:
        import thumbnails

        example = os.path.join(WORKFLOW_DIR, "assets", "attention_edit_example.jpg")
        for path in thumbnails.write_all(built, WORKFLOW_DIR, example):
            print("wrote", path)
    if stale:
        print("stale workflows (run tools/build_workflows.py):", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
