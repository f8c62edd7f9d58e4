"""Helpers shared by the joint-attention families' tests (Flux: test_flux*.py, SD3: test_sd3.py): the node calls
and the invariant checks every family must pass (no leakage into the next run, an interrupted edit leaves the next
run clean)."""

from __future__ import annotations

import pytest
import torch
from conftest import call_node, pkg

SRC, TGT = "a photo of a cat", "a photo of a dog"


def error_of(node_id, **inputs):
    """The node's ValueError message, checked to be one clean line from the pack."""
    with pytest.raises(ValueError) as info:
        call_node(node_id, **inputs)
    message = str(info.value)
    assert message.startswith("[Attention Edit] ") and "\n" not in message.strip(), message
    return message


def hook(model, clip, source=SRC, target=TGT, mode="replace", cross=0.8, self_=0.4, **inputs):
    return call_node("AttnEditAttentionHook", model=model, clip=clip, source_prompt=source, target_prompt=target,
                     mode=mode, cross_replace=cross, self_replace=self_, **inputs)


def edit(model, inv, **inputs):
    edited, source, store = call_node("AttnEditEditSampler", model=model, inversion=inv, **inputs)
    return edited["samples"], source["samples"], store


def assert_no_leakage(model, clip, inv):
    """A hooked edit, then a plain one, then both again: each repeats bit for bit; the input MODEL is untouched."""
    before = repr(model.model_options)
    patched, _t = hook(model, clip, local_blend="cat, dog")
    first = edit(patched, inv)[0]
    plain = edit(model, inv, target=inv.source)[0]
    assert torch.equal(edit(patched, inv)[0], first)
    assert torch.equal(edit(model, inv, target=inv.source)[0], plain)
    assert repr(model.model_options) == before


def assert_interrupt_leaves_the_next_run_clean(model, clip, inv, monkeypatch):
    """Interrupt a hooked edit at its second progress update: the next run equals a fresh one bit for bit."""
    import comfy.model_management as mm

    patched, _t = hook(model, clip, local_blend="cat, dog")
    fresh = edit(patched, inv)[0]
    progress = pkg("inversion.comfy_model").Progress
    original = progress.update
    seen = []

    def stop(self, units=1, x0=None):
        seen.append(units)
        if len(seen) == 2:
            mm.interrupt_current_processing(True)
        return original(self, units, x0)

    monkeypatch.setattr(progress, "update", stop)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            edit(patched, inv)
    finally:
        mm.interrupt_current_processing(False)
        monkeypatch.setattr(progress, "update", original)
    assert len(seen) == 2 and torch.equal(edit(patched, inv)[0], fresh)


def controller_calls(model, inv) -> list[tuple]:
    """Run a same-prompt edit with a recording probability controller; one row per joint call it saw: (kind, block,
    index, chunk labels, grid, probs shape, step)."""
    run_mod, hooks = pkg("attention.run"), pkg("attention.hooks")
    seen = []

    class Recorder(run_mod.Controller):
        EDITS_PROBS = True

        def __deepcopy__(self, memo):
            return self

        def active(self, call):
            return call.run is not None and len(call.run.roles) == 2

        def edit_probs(self, call, probs):
            seen.append((call.kind, call.site.block, call.site.index, call.layout.labels, call.grid,
                         tuple(probs.shape), call.step))
            return probs

    edit(hooks.add_controller(model, Recorder()), inv, target=inv.source)
    return seen


def assert_local_blend_keeps_the_source_outside_the_mask(model, clip, inv, threshold: float):
    """After the last step the target equals the source exactly where the union of the blend words' masks (P2P local
    blend on the captured 8x8 maps of a 16x16 latent, the same running mean the step hook read) is 0, and differs
    inside."""
    p2p = pkg("attention.p2p")
    patched, _t = hook(model, clip, local_blend="cat, dog", blend_threshold=threshold, blend_start=0.0)
    edited, source, store = edit(patched, inv)
    src_tok, tgt_tok = store.prompts[0].find_text("cat"), store.prompts[1].find_text("dog")
    maps = store.cross_map().flatten(1, 2)
    masks = p2p.local_blend_mask(maps, [src_tok, tgt_tok], (16, 16), (8, 8), threshold, 1)
    mask = torch.maximum(masks[0], masks[1])[0]
    outside = mask == 0
    assert 0 < int(outside.sum()) < 256, float(mask.mean())
    assert torch.equal(edited[0][:, outside], source[0][:, outside])
    assert float((edited[0][:, ~outside] - source[0][:, ~outside]).abs().max()) > 1e-4
