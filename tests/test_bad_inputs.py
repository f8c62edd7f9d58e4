"""Bad and edge inputs end in a clear error (naming the input, the value, what was expected, what to connect) or a
correct result; and no run leaks into the next one (issue: bad input and isolation)."""

import copy
import os
import re
import socket
import subprocess
import sys
import types

import pytest
import torch
from conftest import HOST, call_node, make_image, make_latent, pkg

SRC = "a photo of a cat"
LONG = " ".join(["a photo of a cat on a sofa"] * 12)  # > 75 tokens


def error_of(node_id, **inputs):
    with pytest.raises(ValueError) as info:
        call_node(node_id, **inputs)
    message = str(info.value)
    assert message.startswith("[Attention Edit] "), message
    assert "\n" not in message.strip(), message
    return message


@pytest.fixture(scope="module")
def inv(tiny):
    return call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=SRC, method="direct", steps=4,
                     cfg=7.5, latent=make_latent(seed=8))[0]


def hook(tiny, target, **kw):
    args = dict(model=tiny.model, clip=tiny.clip, source_prompt=kw.pop("source", SRC), target_prompt=target,
                mode=kw.pop("mode", "replace"), cross_replace=0.8, self_replace=0.4)
    return call_node("AttnEditAttentionHook", **args, **kw)


# ----------------------------------------------------------------------------------------------- words and prompts
@pytest.mark.parametrize("kwargs, pattern", [
    (dict(target="a photo of a dog", local_blend="horse"),
     r"local blend word 'horse' is in neither prompt \(source: a, photo, of, a, cat; target: a, photo, of, a, dog\)"),
    (dict(target="a photo of a dog", reweight="horse=2"),
     r"the word 'horse' is not in the target prompt 'a photo of a dog'; its tokens are: a, photo, of, a, dog"),
    (dict(target="a photo of a dog", cross_replace_words="cat=0.3"),
     r"the word 'cat' is not in the target prompt"),
    (dict(target="a photo of a big dog"), r"same number of words: source 'a photo of a cat' has 5, target .* has 6. "
                                          r"Use edit mode 'refine'"),
    (dict(target="a cat", source=""), r"same number of words: source '' has 0"),
    (dict(target=LONG, mode="refine"), r"target prompt .* is longer than 75 tokens"),
    (dict(target=LONG, source=LONG, mode="replace"), r"source prompt .* is longer than 75 tokens"),
    (dict(target="a photo of a dog", mode="reweight", reweight="dog=2"), r"mode 'reweight' keeps the prompt"),
    (dict(target=SRC, mode="reweight"), r"mode 'reweight' needs words to re-weight"),
    (dict(target="a photo of a dog", reweight="dog:2"), r"`reweight` item 'dog:2' is not of the form word=number"),
    (dict(target="a photo of a dog", mode="swap"), r"`mode` 'swap' is unknown; choose one of replace, refine, reweight"),
])
def test_prompt_errors_name_the_word_and_the_fix(tiny, kwargs, pattern):
    message = error_of("AttnEditAttentionHook", model=tiny.model, clip=tiny.clip,
                       source_prompt=kwargs.pop("source", SRC), target_prompt=kwargs.pop("target"),
                       mode=kwargs.pop("mode", "replace"), cross_replace=0.8, self_replace=0.4, **kwargs)
    assert re.search(pattern, message), message


def test_empty_and_long_prompts_invert_and_edit(tiny):
    for prompt in ("", LONG):
        inv = call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=prompt, method="ddim",
                        steps=3, cfg=7.5, latent=make_latent(seed=9))[0]
        target = pkg("inversion.comfy_model").encode_text(tiny.clip, prompt)
        edited, source, _ = call_node("AttnEditEditSampler", model=tiny.model, inversion=inv, target=target)
        assert torch.equal(edited["samples"], source["samples"])  # same prompt, no controller: identical branches


def test_preview_word_missing(tiny, inv):
    model, _ = hook(tiny, "a photo of a dog")
    _, _, store = call_node("AttnEditEditSampler", model=model, inversion=inv)
    message = error_of("AttnEditAttentionPreview", attention=store, image=make_image(128), branch="target",
                       words="horse")
    assert "'horse' is not in the target prompt 'a photo of a dog'; its words are: a, photo, of, a, dog" in message


# ----------------------------------------------------------------------------------------------- images, latents
@pytest.mark.parametrize("inputs, pattern", [
    ({}, r"nothing to invert: connect `image` \(with `vae`\) or `latent`"),
    ({"image": "img"}, r"`image` needs a `vae` to be encoded; connect the checkpoint's VAE"),
    ({"image": "img", "vae": "vae", "latent": "lat"}, r"both `image` and `latent` are connected"),
    ({"latent": "lat", "method": "euler"}, r"`method` 'euler' is unknown; choose one of ddim, null_text"),
    ({"image": "tiny_img", "vae": "vae"}, r"`image` is 4x4 px; at least 8x8 px is needed"),
])
def test_invert_input_errors(tiny, inputs, pattern):
    values = {"img": make_image(64), "vae": tiny.vae, "lat": make_latent(), "tiny_img": make_image(4)}
    args = {k: values.get(v, v) for k, v in inputs.items()}
    args.setdefault("method", "ddim")
    message = error_of("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=SRC, steps=3, cfg=7.5,
                       **args)
    assert re.search(pattern, message), message


@pytest.mark.parametrize("size", [(72, 88), (130, 127)])
def test_sizes_not_multiple_of_64_or_8_work(tiny, size):
    image = make_image(max(size))[:, : size[0], : size[1]]
    inv, noise, _, recon, psnr, store = call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip,
                                                  source_prompt=SRC, method="ddim", steps=3, cfg=1.0, image=image,
                                                  vae=tiny.vae)
    h, w = size[0] // 8, size[1] // 8
    assert noise["samples"].shape[-2:] == (h, w) and recon["samples"].shape[-2:] == (h, w)
    model, _ = hook(tiny, "a photo of a dog", local_blend="cat, dog")
    edited, _, _ = call_node("AttnEditEditSampler", model=model, inversion=inv)
    assert edited["samples"].shape[-2:] == (h, w) and torch.isfinite(edited["samples"]).all()
    assert psnr > 0


def test_image_batch_of_three(tiny):
    inv, noise, *_ = call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=SRC, method="direct",
                               steps=3, cfg=7.5, image=make_image(64, batch=3), vae=tiny.vae)
    assert inv.batch == 3 and noise["samples"].shape[0] == 3 and len(inv.psnr) == 3
    edited, source, store = call_node("AttnEditEditSampler", model=hook(tiny, "a photo of a dog")[0], inversion=inv)
    assert edited["samples"].shape[0] == 3 and store.rows == 6


# ----------------------------------------------------------------------------------------------- sampler wiring
def test_sampler_wiring_errors(tiny, inv):
    other = pkg("inversion.trajectory").InversionTrajectory(**{**inv.__dict__, "fingerprint": ("SDXL", "sdxl", "", 1)})
    dog = pkg("inversion.comfy_model").encode_text(tiny.clip, "a photo of a dog")
    bird = pkg("inversion.comfy_model").encode_text(tiny.clip, "a photo of a bird")
    cases = [
        (dict(model=tiny.model, inversion=other, target=dog), r"`inversion` was made with another model"),
        (dict(model=tiny.model, inversion=inv), r"no target prompt: connect `target`"),
        (dict(model=hook(tiny, "a dog", source="a cat")[0], inversion=inv),
         r"the attention hook's source prompt 'a cat' differs from the prompt the inversion was made with"),
        (dict(model=hook(tiny, "a photo of a dog")[0], inversion=inv, target=bird),
         r"`target` is not the attention hook's target prompt 'a photo of a dog'"),
        (dict(model=tiny.model, inversion=inv, target=dog + bird), r"`target` has 2 entries"),
        (dict(model=tiny.model, inversion=inv, target=[]), r"`target` is empty"),
    ]
    for inputs, pattern in cases:
        message = error_of("AttnEditEditSampler", **inputs)
        assert re.search(pattern, message), message


def test_unsupported_model_family_is_named(tiny):
    class Flux:  # a config class of a model family this pack does not handle
        pass

    fake = types.SimpleNamespace(model=types.SimpleNamespace(model_config=Flux(), diffusion_model=torch.nn.Linear(1, 1)))
    for node_id, inputs in [
        ("AttnEditInvert", dict(clip=tiny.clip, source_prompt=SRC, method="ddim", steps=3, cfg=7.5,
                                latent=make_latent())),
        ("AttnEditAttentionHook", dict(clip=tiny.clip, source_prompt=SRC, target_prompt=SRC, mode="replace",
                                       cross_replace=0.8, self_replace=0.4)),
    ]:
        message = error_of(node_id, model=fake, **inputs)
        assert "supports SD1.x, SD2.x, SDXL UNet models; the connected MODEL is Flux" in message


def test_fp16_model_weights(tiny):
    import tiny_models

    with torch.inference_mode():
        half = tiny_models.make_model(0, dtype=torch.float16)
    inv, _, _, recon, _, _ = call_node("AttnEditInvert", model=half, clip=tiny.clip, source_prompt=SRC,
                                       method="null_text", steps=3, cfg=7.5, latent=make_latent(), inner_steps=2)
    assert torch.isfinite(recon["samples"]).all() and inv.uncond.dtype == torch.float32
    patched, target = call_node("AttnEditAttentionHook", model=half, clip=tiny.clip, source_prompt=SRC,
                                target_prompt="a photo of a dog", mode="replace", cross_replace=0.8, self_replace=0.4)
    edited, _, _ = call_node("AttnEditEditSampler", model=patched, inversion=inv)
    assert torch.isfinite(edited["samples"]).all()


def test_foreign_attention_patch_is_left_alone(tiny, inv, caplog):
    foreign = tiny.model.clone()
    calls = []

    def other_pack(q, k, v, extra_options):
        calls.append(1)
        from comfy.ldm.modules.attention import optimized_attention

        return optimized_attention(q, k, v, extra_options["n_heads"])

    foreign.set_model_attn2_replace(other_pack, "input", 7)
    model, _ = call_node("AttnEditAttentionHook", model=foreign, clip=tiny.clip, source_prompt=SRC,
                         target_prompt="a photo of a dog", mode="replace", cross_replace=0.8, self_replace=0.4)
    edited, _, _ = call_node("AttnEditEditSampler", model=model, inversion=inv)
    assert calls and torch.isfinite(edited["samples"]).all()
    assert "already patched by another node" in caplog.text


# ----------------------------------------------------------------------------------------------- isolation
def test_interrupted_null_text_leaves_the_next_run_clean(tiny, monkeypatch):
    import comfy.model_management as mm

    args = dict(model=tiny.model, clip=tiny.clip, source_prompt=SRC, method="null_text", steps=3, cfg=7.5,
                latent=make_latent(seed=10), inner_steps=2)
    fresh = call_node("AttnEditInvert", **args)[3]["samples"]
    progress = pkg("inversion.comfy_model").Progress
    original = progress.update

    def interrupt_midway(self, units=1, x0=None):
        if self.done >= 5:
            mm.interrupt_current_processing(True)
        return original(self, units, x0)

    monkeypatch.setattr(progress, "update", interrupt_midway)
    with pytest.raises(mm.InterruptProcessingException):
        call_node("AttnEditInvert", **args)
    mm.interrupt_current_processing(False)
    monkeypatch.setattr(progress, "update", original)
    assert torch.equal(call_node("AttnEditInvert", **args)[3]["samples"], fresh)
    assert not any(k.startswith("attnedit") for k in tiny.model.model_options.get("transformer_options", {}))


def test_patch_nodes_leave_the_input_model_untouched(tiny):
    before = copy.deepcopy(tiny.model.model_options)
    patches = copy.copy(tiny.model.object_patches)
    hook(tiny, "a photo of a dog", local_blend="cat, dog", reweight="dog=2")
    hook(tiny, "a photo of a fluffy cat", mode="refine")
    assert tiny.model.model_options == before and tiny.model.object_patches == patches


KSAMPLER_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
import comfy_host
comfy_host.boot()
import tiny_models, nodes
b = tiny_models.make_bundle(0)
pos = b.clip.encode_from_tokens(b.clip.tokenize("a photo of a dog"), return_pooled=True)
neg = b.clip.encode_from_tokens(b.clip.tokenize(""), return_pooled=True)
latent = {"samples": torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(11))}
with torch.inference_mode():
    out = nodes.KSampler().sample(b.model, 5, 3, 6.0, "euler", "normal", [[pos[0], {"pooled_output": pos[1]}]],
                                  [[neg[0], {"pooled_output": neg[1]}]], latent, 1.0)[0]["samples"]
torch.save(out, sys.argv[2])
"""


def test_plain_ksampler_after_our_runs_matches_a_fresh_process(tiny, inv, tmp_path):
    """After edits, a failed run and an interrupted one, core KSampler on the original MODEL is bit-identical to a
    fresh process (no global patch, no state left on the model)."""
    import tiny_models

    import nodes

    model, _ = hook(tiny, "a photo of a dog", local_blend="cat, dog")
    call_node("AttnEditEditSampler", model=model, inversion=inv)
    with pytest.raises(ValueError):
        call_node("AttnEditEditSampler", model=tiny.model, inversion=inv)
    script = tmp_path / "ksampler.py"
    script.write_text(KSAMPLER_SCRIPT)
    tools_dir = os.path.dirname(tiny_models.__file__)
    subprocess.run([sys.executable, str(script), tools_dir, str(tmp_path / "fresh.pt")], check=True,
                   capture_output=True, env={**os.environ, "COMFYUI_PATH": HOST.comfy_path})
    fresh = torch.load(tmp_path / "fresh.pt", weights_only=True)
    pos = pkg("inversion.comfy_model").encode_text(tiny.clip, "a photo of a dog")
    neg = pkg("inversion.comfy_model").encode_text(tiny.clip, "")
    latent = {"samples": torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(11))}
    with torch.inference_mode():
        here = nodes.KSampler().sample(tiny.model, 5, 3, 6.0, "euler", "normal", pos, neg, latent, 1.0)[0]["samples"]
    assert torch.equal(here, fresh)


def test_no_network_access_at_run_time(tiny, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    inv = call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=SRC, method="null_text",
                    steps=3, cfg=7.5, image=make_image(64), vae=tiny.vae, inner_steps=2)[0]
    model, _ = hook(tiny, "a photo of a dog", local_blend="cat, dog")
    call_node("AttnEditEditSampler", model=model, inversion=inv)
