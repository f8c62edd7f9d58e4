"""Tiny Stable-Diffusion-shaped MODEL / CLIP / VAE built from ComfyUI's own classes with seeded random weights.

They are wrapped exactly as ComfyUI wraps a loaded checkpoint (ModelPatcher, comfy.sd.CLIP, comfy.sd.VAE), keep the
real block topology (so attention sites have the real ComfyUI keys) and use ComfyUI's shipped SD1 tokenizer, so
prompts tokenize exactly as with a real checkpoint. Pictures made with them are noise: they exist to exercise code
paths and exact maths on CPU in seconds, never to judge image quality.

Developer tooling (tests, headless smoke runs, benchmark CPU mode). Import only after tools.comfy_host.boot().
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch

TINY_CONTEXT_DIM = 32
TINY_CLIP_CONFIG = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 49407,
    "hidden_act": "quick_gelu",
    "hidden_size": TINY_CONTEXT_DIM,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 64,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "pad_token_id": 1,
    "projection_dim": TINY_CONTEXT_DIM,
    "torch_dtype": "float32",
    "vocab_size": 49408,  # the 2024 host hard-codes the SD1 vocabulary size
}
# SD1.5 block topology (same input/middle/output block ids as the real model) at 1/10 of the width.
TINY_SD1_UNET = {
    "use_checkpoint": False,
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "num_res_blocks": [2, 2, 2, 2],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_middle": 1,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "context_dim": TINY_CONTEXT_DIM,
    "use_spatial_transformer": True,
    "legacy": False,
    "use_linear_in_transformer": False,
    "adm_in_channels": None,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
    "num_heads": 4,
    "num_head_channels": -1,
}
TINY_VAE_DDCONFIG = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 64,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 1, 1, 1],  # four levels: ComfyUI hard-codes the x8 downscale of SD VAEs
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "dropout": 0.0,
}


def scratch_dir() -> str:
    """This process's folder for the tiny models' config files, removed when the process exits."""
    global _SCRATCH
    if _SCRATCH is None:
        _SCRATCH = tempfile.mkdtemp(prefix="attnedit_tiny_")
        atexit.register(shutil.rmtree, _SCRATCH, True)
    return _SCRATCH


_SCRATCH: str | None = None


def _clip_config_path() -> str:
    path = os.path.join(scratch_dir(), "tiny_clip.json")
    if not os.path.exists(path):
        with open(path, "w") as f:
            json.dump(TINY_CLIP_CONFIG, f)
    return path


def init_weights(module: torch.nn.Module, seed: int) -> None:
    """Seeded init: ComfyUI creates layers uninitialised (torch.empty), so every parameter must be written."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in module.modules():
            for name, param in mod.named_parameters(recurse=False):
                if isinstance(mod, torch.nn.GroupNorm | torch.nn.LayerNorm):
                    param.fill_(1.0 if name == "weight" else 0.0)
                elif param.ndim >= 2:
                    fan_in = max(1, param[0].numel())
                    param.copy_(torch.randn(param.shape, generator=gen) / fan_in**0.5)
                else:
                    param.zero_()


def _tiny_sd15_config():
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.supported_models_base

    class TinySD15(comfy.supported_models.SD15):
        """SD1.5 family (subclass, so family checks see SD1.x) with the tiny widths."""

        unet_config = {"context_dim": TINY_CONTEXT_DIM, "model_channels": 32, "use_linear_in_transformer": False,
                       "adm_in_channels": None, "use_temporal_attention": False}
        unet_extra_config = {"num_heads": 4, "num_head_channels": -1}

        def clip_target(self, state_dict=None):
            target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
            target.params = {"clip_model": comfy.sd1_clip.SDClipModel, "textmodel_json_config": _clip_config_path()}
            return target

    return TinySD15(dict(TINY_SD1_UNET))


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32, top_level_attention: bool = True):
    """A tiny SD1.x-shaped MODEL (ModelPatcher over comfy.model_base.BaseModel, eps prediction).

    `top_level_attention=False` drops the transformers of the latent-resolution level (input blocks 1-2, output
    blocks 9-11) and keeps SD1.5's at 1/2, 1/4 (the papers' "16x16" level) and the middle: a real 96x96 latent
    (SD1.5 at 768 px) then runs in seconds on a CPU instead of minutes (9216-token self-attention)."""
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher

    cfg = _tiny_sd15_config()
    cfg.unet_config["dtype"] = dtype
    if not top_level_attention:
        cfg.unet_config["transformer_depth"] = [0, 0] + TINY_SD1_UNET["transformer_depth"][2:]
        cfg.unet_config["transformer_depth_output"] = [0, 0, 0] + TINY_SD1_UNET["transformer_depth_output"][3:]
    model = comfy.model_base.BaseModel(cfg, model_type=comfy.model_base.ModelType.EPS, device=mm.unet_offload_device())
    init_weights(model, seed)
    model.to(dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def make_inpaint_model(seed: int = 3, dtype: torch.dtype = torch.float32):
    """A tiny SD1.x INPAINTING MODEL: the same UNet with 9 input channels (latent + mask + masked-image latent) and
    ComfyUI's inpaint setup (`set_inpaint()`), as a loaded sd-v1-5-inpainting checkpoint is."""
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher

    cfg = _tiny_sd15_config()
    cfg.unet_config["in_channels"] = 9
    cfg.unet_config["dtype"] = dtype
    model = comfy.model_base.BaseModel(cfg, model_type=comfy.model_base.ModelType.EPS, device=mm.unet_offload_device())
    model.set_inpaint()
    init_weights(model, seed)
    model.to(dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def make_clip(seed: int = 1):
    """A tiny SD1 text encoder (comfy.sd.CLIP) with ComfyUI's shipped SD1 tokenizer. Build under no_grad (2024 host)."""
    import comfy.sd

    with torch.no_grad():
        clip = comfy.sd.CLIP(_tiny_sd15_config().clip_target())
        init_weights(clip.cond_stage_model, seed)
    return clip


def make_vae(seed: int = 2):
    """A tiny KL autoencoder (comfy.sd.VAE) with the SD x8 downscale."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    with torch.no_grad():
        ae = AutoencoderKL(ddconfig=TINY_VAE_DDCONFIG, embed_dim=4)
        init_weights(ae, seed)
        return comfy.sd.VAE(sd=ae.state_dict(), config={"params": {"ddconfig": TINY_VAE_DDCONFIG, "embed_dim": 4}})


def constant_eps_model(model, eps: torch.Tensor):
    """A clone whose denoiser is analytic: eps_theta(x, sigma, c) == eps for every input (exact-maths tests).

    Installed as ComfyUI's unet function wrapper: denoised = x - sigma * eps in k-diffusion (VE) space.
    """
    m = model.clone()

    def analytic(apply_model, args):
        x, sigma = args["input"], args["timestep"]
        return x - eps.to(x).expand_as(x) * sigma.view(-1, 1, 1, 1).to(x)

    m.set_model_unet_function_wrapper(analytic)
    return m


TINY_ADAPTER_CHANNELS = [32, 64, 128, 128]  # TINY_SD1_UNET model_channels * channel_mult: one feature per level


def make_t2i_adapter(seed: int = 3, hint_channels: int = 3, channels: list[int] | None = None):
    """A tiny T2I-Adapter (ComfyUI's comfy.t2i_adapter.adapter.Adapter, random weights) matched to the tiny UNet,
    wrapped exactly as Load ControlNet Model wraps an adapter file (comfy.controlnet.load_t2i_adapter -> T2IAdapter).

    Its four features (latent resolution and three halvings) are added after input blocks 2, 5, 8 and 11, as SD1.x
    T2I-Adapters are. Apply it with core ControlNetApply / ControlNetApplyAdvanced. `channels` [320, 640, 1280, 1280]
    gives the full-size SD1.x adapter architecture (the benchmark's GPU mode).
    """
    import comfy.controlnet
    from comfy.t2i_adapter.adapter import Adapter

    with torch.no_grad():
        net = Adapter(channels=list(channels or TINY_ADAPTER_CHANNELS), nums_rb=2, cin=hint_channels * 64, ksize=1, sk=True,
                      use_conv=False, xl=False)
        init_weights(net, seed)
        return comfy.controlnet.load_t2i_adapter(net.state_dict())


@dataclass
class TinyBundle:
    model: object
    clip: object
    vae: object


def make_bundle(seed: int = 0) -> TinyBundle:
    with torch.inference_mode():  # as the executor would: loaders run under inference_mode
        return TinyBundle(make_model(seed), make_clip(seed + 1), make_vae(seed + 2))


class AttnEditTestTinyCheckpoint:
    """Test/smoke-run only (never shipped in NODE_CLASS_MAPPINGS): stands in for CheckpointLoaderSimple."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": ("STRING", {"default": "tiny"})},
                "optional": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "Attention Edit/testing"

    def load(self, ckpt_name, seed=0):
        """The family follows the placeholder's name: "flux" -> tiny Flux-dev (ComfyUI 0.3.x only; its 16-channel
        VAE), "sd3" -> tiny SD3.5-shaped MMDiT (ComfyUI 0.3.x only; the same 16-channel VAE), "xl" -> tiny SDXL ("xl" + "inpaint": its 9-channel inpainting UNet), "inpaint" -> tiny SD1 9-channel
        inpainting UNet, "v2"/"768-v" -> tiny SD2 v-pred, else SD1."""
        import tiny_families

        name = str(ckpt_name).lower()
        if "flux" in name:  # raises a clear RuntimeError on the 2024 host, which has no Flux
            model, clip = tiny_families.make_flux(seed)
            return (model, clip, tiny_families.make_flux_vae(seed + 2))
        if "sd3" in name:  # raises a clear RuntimeError on the 2024 host, which has no SD3
            model, clip = tiny_families.make_sd3(seed)
            return (model, clip, tiny_families.make_flux_vae(seed + 2))
        if "xl" in name and "inpaint" in name:
            model, clip = tiny_families.make_sdxl(seed + 3, inpaint=True)
        elif "inpaint" in name:
            model, clip = make_inpaint_model(seed + 3), make_clip(seed + 1)
        elif "xl" in name:
            model, clip = tiny_families.make_sdxl(seed)
        elif "v2" in name or "768-v" in name or "sd2" in name:
            model, clip = tiny_families.make_sd2v(seed)
        else:
            model, clip = make_model(seed), make_clip(seed + 1)
        return (model, clip, make_vae(seed + 2))


class AttnEditTestTinyAdapter:
    """Test/smoke-run only (never shipped in NODE_CLASS_MAPPINGS): stands in for ControlNetLoader with the tiny
    random T2I-Adapter (a real adapter cannot run on the tiny UNet); an "xl" name gives the tiny SDXL adapter."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"control_net_name": ("STRING", {"default": "tiny"})},
                "optional": {"seed": ("INT", {"default": 3, "min": 0, "max": 2**31})}}

    RETURN_TYPES = ("CONTROL_NET",)
    FUNCTION = "load"
    CATEGORY = "Attention Edit/testing"

    def load(self, control_net_name, seed=3):
        if "xl" in str(control_net_name).lower():
            import tiny_families

            return (tiny_families.make_t2i_adapter_xl(seed),)
        return (make_t2i_adapter(seed),)


TEST_NODES = {"AttnEditTestTinyCheckpoint": AttnEditTestTinyCheckpoint,
              "AttnEditTestTinyAdapter": AttnEditTestTinyAdapter}


# Smoke runs (tests, the runner without a checkpoint): the tiny UNet costs ~3 s per call at a 64x64 latent on 2 CPU
# cores but ~0.05 s at 16x16, so images are staged at SMOKE_IMAGE_SIZE and iteration knobs are capped. Technique
# nodes add their expensive knobs here (input name -> cap).
SMOKE_IMAGE_SIZE = 128
SMOKE_CAPS = {"steps": 8, "inner_steps": 2,
              "token_iterations": 2, "null_text_iterations": 2,  # DPL
              "seeds": 2,  # InstDiffEdit
              "max_iterations": 2, "guidance_steps": 2, "blend_steps": 2}  # MAG-Edit Guidance


# Per node type: core nodes whose size inputs would undo the smoke image size (masks may keep any size: the pack
# aligns every MASK to the latent grid).
SMOKE_NODE_CAPS = {"ImageScale": {"width": SMOKE_IMAGE_SIZE, "height": SMOKE_IMAGE_SIZE}}


def cap_for_smoke(prompt: dict) -> list[str]:
    """Cap the expensive inputs of an API-format prompt in place; returns 'node.input' names that were lowered."""
    lowered = []
    for nid, node in prompt.items():
        for name, cap in {**SMOKE_CAPS, **SMOKE_NODE_CAPS.get(node["class_type"], {})}.items():
            value = node["inputs"].get(name)
            if isinstance(value, int | float) and not isinstance(value, bool) and value > cap:
                node["inputs"][name] = type(value)(cap)
                lowered.append(f"{nid}.{name}")
    return lowered


def write_smoke_image(source: str, target: str, size: int = SMOKE_IMAGE_SIZE) -> None:
    """A copy of `source` scaled so its longer side is `size` (multiple of 8) for smoke runs."""
    from PIL import Image

    img = Image.open(source).convert("RGB")
    scale = size / max(img.size)
    w, h = (max(8, int(round(d * scale / 8)) * 8) for d in img.size)
    img.resize((w, h), Image.LANCZOS).save(target)


# ------------------------------------------------------------------------------------------------ tiny SAM
# A Segment Anything model of the official topology (ViT encoder with windowed + global blocks, prompt encoder,
# two-way mask decoder) at toy sizes: 64 px input, 4x4 image embedding, width 32. Built straight from the
# segment_anything package's classes with seeded random weights, so the pack's loader must recover every size from
# the file alone.
TINY_SAM = {"img_size": 64, "patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": (1,),
            "window_size": 2, "prompt_dim": 32, "decoder_mlp_dim": 64}
TINY_SAM_FILE = "attnedit_tiny_sam.safetensors"


def make_tiny_sam(seed: int = 5):
    """A tiny random segment_anything.modeling.Sam (eval mode, CPU, float32)."""
    from functools import partial

    from segment_anything import modeling

    cfg = TINY_SAM
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's RNG
        torch.manual_seed(seed)
        return _tiny_sam(modeling, cfg, partial)


def _tiny_sam(modeling, cfg, partial):
    grid = cfg["img_size"] // cfg["patch_size"]
    encoder = modeling.ImageEncoderViT(
        depth=cfg["depth"], embed_dim=cfg["embed_dim"], img_size=cfg["img_size"], mlp_ratio=2,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=cfg["num_heads"], patch_size=cfg["patch_size"],
        qkv_bias=True, use_rel_pos=True, global_attn_indexes=cfg["global_attn_indexes"],
        window_size=cfg["window_size"], out_chans=cfg["prompt_dim"])
    prompt = modeling.PromptEncoder(embed_dim=cfg["prompt_dim"], image_embedding_size=(grid, grid),
                                    input_image_size=(cfg["img_size"], cfg["img_size"]), mask_in_chans=16)
    decoder = modeling.MaskDecoder(
        num_multimask_outputs=3, transformer_dim=cfg["prompt_dim"], iou_head_depth=3, iou_head_hidden_dim=32,
        transformer=modeling.TwoWayTransformer(depth=2, embedding_dim=cfg["prompt_dim"],
                                               mlp_dim=cfg["decoder_mlp_dim"], num_heads=8))
    sam = modeling.Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder,
                       pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
    with torch.no_grad():  # non-zero relative positions so every weight matters
        for name, param in sam.named_parameters():
            if "rel_pos" in name:
                param.normal_(0.0, 0.02)
    return sam.eval()


def write_tiny_sam(folder: str, name: str = TINY_SAM_FILE, seed: int = 5) -> str:
    """Save a tiny SAM checkpoint (.safetensors, or .pth/.pt via torch.save) into `folder`; returns its path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    state = {k: v.contiguous() for k, v in make_tiny_sam(seed).state_dict().items()}
    if name.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, path)
    else:
        torch.save(state, path)
    return path


def register_tiny_sam(name: str = TINY_SAM_FILE) -> str:
    """Write a tiny SAM into a temp models/sams folder known to ComfyUI's folder_paths (idempotent); returns the name."""
    import folder_paths

    folder = os.path.join(scratch_dir(), "sams")
    if not os.path.isfile(os.path.join(folder, name)):
        write_tiny_sam(folder, name)
    folder_paths.add_model_folder_path("sams", folder)
    return name
