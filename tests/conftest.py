"""Shared fixtures: boots the ComfyUI host named by COMFYUI_PATH (default: the CI host) once per session, with this
pack loaded through ComfyUI's own custom-node loader, and builds tiny seeded models from ComfyUI's real classes."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

import comfy_host  # noqa: E402

HOST = comfy_host.boot()

import tiny_models  # noqa: E402

HOST.register(tiny_models.TEST_NODES)


@pytest.fixture(scope="session")
def host():
    return HOST


def pkg(dotted: str):
    """A module of the pack as ComfyUI loaded it, e.g. pkg("attention.seq_align")."""
    return HOST.module(dotted)


@pytest.fixture(scope="session")
def tiny():
    return tiny_models.make_bundle(0)
