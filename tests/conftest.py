"""Shared fixtures: boots the ComfyUI host named by COMFYUI_PATH (default: the CI host) once per session, with this
pack loaded through ComfyUI's own custom-node loader, and builds tiny seeded models from ComfyUI's real classes."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

import comfy_host  # noqa: E402
import tiny_models  # noqa: E402

HOST = comfy_host.boot()
HOST.register(tiny_models.TEST_NODES)


def skip_allowed(needs_newer_host: bool, host_is_new: bool) -> bool:
    """The one skip the suite allows: a test marked `newer_host` (a family or API the 2024 host lacks) on that host.
    Everything else runs on both hosts; a skip anywhere else is reported as a failure."""
    return needs_newer_host and not host_is_new


def pytest_runtest_setup(item):
    marker = item.get_closest_marker("newer_host")
    if marker is not None and skip_allowed(True, HOST.is_new):
        reason = marker.args[0] if marker.args else "uses an API that only ComfyUI 0.3.x has"
        pytest.skip(f"needs ComfyUI 0.3.x (this host is ComfyUI 2024-03): {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and \
            not skip_allowed(item.get_closest_marker("newer_host") is not None, HOST.is_new):
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} was skipped on {HOST.comfy_path}, but only tests marked newer_host may skip "
                           f"(and only on ComfyUI 2024-03): {report.longrepr}")


@pytest.fixture(scope="session")
def host():
    return HOST


def pkg(dotted: str):
    """A module of the pack as ComfyUI loaded it, e.g. pkg("attention.seq_align")."""
    return HOST.module(dotted)


@pytest.fixture(scope="session")
def tiny():
    return tiny_models.make_bundle(0)


def call_node(node_id: str, _function: str | None = None, **inputs):
    """Call a pack node's function in-process the way the executor does (under inference_mode); returns `result`."""
    import torch

    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS[node_id]
    with torch.inference_mode():
        out = getattr(cls(), _function or cls.FUNCTION)(**inputs)
    return out["result"] if isinstance(out, dict) else out


def make_image(size: int = 128, batch: int = 1, seed: int = 0):
    """A smooth seeded test picture (IMAGE [B, H, W, 3]): blobs on a gradient, so maps and masks have structure."""
    import torch

    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    images = []
    for _ in range(batch):
        img = torch.stack([xx, yy, 1 - xx], -1) * 0.5
        for _ in range(3):
            cx, cy, r = torch.rand(3, generator=g).tolist()
            blob = (((xx - cx) ** 2 + (yy - cy) ** 2) < (0.1 + 0.2 * r) ** 2).float()
            img = img * (1 - blob[..., None]) + blob[..., None] * torch.rand(3, generator=g)
        images.append(img)
    return torch.stack(images).clamp(0, 1)


def make_latent(size: int = 16, batch: int = 1, seed: int = 0):
    import torch

    return {"samples": torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(seed))}
