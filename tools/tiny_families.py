"""Tiny SDXL- and SD2.x-shaped models from ComfyUI's own classes (test tooling, like tiny_models.py for SD1.x).

- SDXL: comfy.model_base.SDXL (adm / size conditioning), 3 levels with transformer depths 2 and 3 (the real model has
  2 and 10), linear in/out projections, two text encoders (clip_l and clip_g, the real SDXL tokenizers) whose
  hidden states are concatenated, pooled output from clip_g.
- SDXL inpainting: the same UNet with 9 input channels and ComfyUI's inpaint setup (as sd_xl_inpainting_0.1 loads).
- SDXL T2I-Adapter: ComfyUI's Adapter in its SDXL layout (xl=True: pixel unshuffle 16, features after input blocks
  3, 5, 8 and the middle block), matched to the tiny SDXL widths.
- SD2.x: v-prediction BaseModel with an OpenCLIP-style "h" encoder (pad token 0, penultimate layer).
Pictures are noise; these exist to run the family-specific code paths on CPU in seconds.
"""

from __future__ import annotations

import inspect
import json
import os

import torch
from tiny_models import TINY_CLIP_CONFIG, init_weights, scratch_dir

L_DIM, G_DIM, H_DIM = 32, 32, 32


def _config_file(name: str, **overrides) -> str:
    path = os.path.join(scratch_dir(), f"tiny_{name}.json")
    overrides.setdefault("num_hidden_layers", 3)  # the penultimate layer (layer_idx -2) must exist
    if not os.path.exists(path):
        with open(path, "w") as f:
            json.dump({**TINY_CLIP_CONFIG, **overrides}, f)
    return path


def _clip_kwargs(cls, **kwargs) -> dict:
    """Only the keyword arguments this host's constructor accepts (the hosts differ in model_options etc.)."""
    accepted = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in kwargs.items() if k in accepted}


def _model_and_clip(model, cfg, seed: int):
    """(MODEL, CLIP) of a tiny model: a ModelPatcher over `model` and the config's own text encoders with seeded
    random weights (seed + 1)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd

    patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    with torch.no_grad():
        clip = comfy.sd.CLIP(cfg.clip_target())
        init_weights(clip.cond_stage_model, seed + 1)
    return patcher, clip


def _sdxl_classes():
    import comfy.model_base
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models
    import comfy.supported_models_base

    class TinySDXLClipModel(comfy.sdxl_clip.SDXLClipModel):
        """SDXLClipModel (l + g, concatenated hidden states, g pooled) with tiny encoders."""

        def __init__(self, device="cpu", dtype=None, model_options=None, **kwargs):
            torch.nn.Module.__init__(self)
            sd_clip = comfy.sd1_clip.SDClipModel
            common = dict(device=device, dtype=dtype, layer="hidden", layer_idx=-2, layer_norm_hidden_state=False,
                          model_options=model_options or {})
            self.clip_l = sd_clip(**_clip_kwargs(sd_clip, textmodel_json_config=_config_file("l", hidden_size=L_DIM,
                                                                                            projection_dim=L_DIM),
                                                 **common))
            self.clip_g = sd_clip(**_clip_kwargs(sd_clip, textmodel_json_config=_config_file(
                "g", hidden_size=G_DIM, projection_dim=G_DIM), special_tokens={"start": 49406, "end": 49407, "pad": 0},
                return_projected_pooled=True, **common))
            self.dtypes = {dtype}

    class TinySDXL(comfy.supported_models.SDXL):
        unet_config = {"model_channels": 32, "use_linear_in_transformer": True, "context_dim": L_DIM + G_DIM,
                       "adm_in_channels": G_DIM + 6 * 256, "use_temporal_attention": False}
        unet_extra_config = {"num_heads": -1, "num_head_channels": 16}

        def clip_target(self, state_dict=None):
            return comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, TinySDXLClipModel)

    return TinySDXL, comfy.model_base.SDXL


TINY_SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": G_DIM + 6 * 256, "in_channels": 4, "model_channels": 32,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 3, 3], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 3, "use_linear_in_transformer": True, "context_dim": L_DIM + G_DIM,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 3, 3, 3], "use_temporal_attention": False,
    "use_temporal_resblock": False, "num_heads": -1, "num_head_channels": 16,
}
TINY_SD2_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 32, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": True, "context_dim": H_DIM, "num_heads": -1, "num_head_channels": 16,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


def _sd2_classes():
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.supported_models_base

    try:
        from comfy.text_encoders import sd2_clip
    except ImportError:  # the 2024 host keeps it at comfy/sd2_clip.py
        from comfy import sd2_clip

    class TinySD2ClipModel(comfy.sd1_clip.SD1ClipModel):
        """SD2ClipModel ("h", OpenCLIP special tokens, penultimate layer) with a tiny encoder."""

        def __init__(self, device="cpu", dtype=None, model_options=None, **kwargs):
            sd_clip = comfy.sd1_clip.SDClipModel
            extra = _clip_kwargs(sd_clip, textmodel_json_config=_config_file("h", hidden_size=H_DIM,
                                                                              projection_dim=H_DIM),
                                 layer="hidden", layer_idx=-2, special_tokens={"start": 49406, "end": 49407, "pad": 0})
            # the current host passes model_options on to the encoder itself; the 2024 host has none
            outer = _clip_kwargs(comfy.sd1_clip.SD1ClipModel, model_options=model_options or {})
            super().__init__(device=device, dtype=dtype, clip_name="h", clip_model=sd_clip, **outer, **extra)

    class TinySD2V(comfy.supported_models.SD20):
        unet_config = {"context_dim": H_DIM, "model_channels": 32, "use_linear_in_transformer": True,
                       "adm_in_channels": None, "use_temporal_attention": False}
        unet_extra_config = {"num_heads": -1, "num_head_channels": 16}

        def clip_target(self, state_dict=None):
            return comfy.supported_models_base.ClipTarget(sd2_clip.SD2Tokenizer, TinySD2ClipModel)

    return TinySD2V


def make_sdxl(seed: int = 0, inpaint: bool = False):
    """(MODEL, CLIP) of a tiny SDXL-shaped model (eps prediction); `inpaint`: the 9-channel inpainting UNet."""
    import comfy.model_management as mm

    config_cls, model_cls = _sdxl_classes()
    cfg = config_cls(dict(TINY_SDXL_UNET, in_channels=9 if inpaint else 4))
    with torch.inference_mode():
        model = model_cls(cfg, device=mm.unet_offload_device())
        if inpaint:
            model.set_inpaint()
        init_weights(model, seed)
    return _model_and_clip(model, cfg, seed)


TINY_SDXL_ADAPTER_CHANNELS = [32, 64, 128, 128]  # TINY_SDXL_UNET model_channels * [1, 2, 4, 4], as 320/640/1280


def make_t2i_adapter_xl(seed: int = 4, hint_channels: int = 3):
    """A tiny SDXL T2I-Adapter (ComfyUI's comfy.t2i_adapter.adapter.Adapter with xl=True, random weights), wrapped as
    Load ControlNet Model wraps an adapter file (comfy.controlnet.load_t2i_adapter, which recognises the SDXL layout
    from its 16x16 pixel unshuffle: cin = hint_channels * 256).

    Its features (half the latent resolution, then a quarter) are added after SDXL input blocks 3, 5, 8 and the
    middle block, as real SDXL T2I-Adapters are. Apply it with core ControlNetApply / ControlNetApplyAdvanced.
    """
    import comfy.controlnet
    from comfy.t2i_adapter.adapter import Adapter

    with torch.no_grad():
        net = Adapter(channels=TINY_SDXL_ADAPTER_CHANNELS, nums_rb=2, cin=hint_channels * 256, ksize=1, sk=True,
                      use_conv=False, xl=True)
        init_weights(net, seed)
        return comfy.controlnet.load_t2i_adapter(net.state_dict())


def make_sd2v(seed: int = 0):
    """(MODEL, CLIP) of a tiny SD2.x-shaped v-prediction model."""
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd

    cfg = _sd2_classes()(dict(TINY_SD2_UNET))
    with torch.inference_mode():
        model = comfy.model_base.BaseModel(cfg, model_type=comfy.model_base.ModelType.V_PREDICTION,
                                           device=mm.unet_offload_device())
        init_weights(model, seed)
    return _model_and_clip(model, cfg, seed)


class ConstantEpsUNet:
    """Stand-in UNet forward whose raw output makes the host's parameterisation (eps or v) imply noise == eps.

    Installed with ModelPatcher.add_object_patch("diffusion_model.forward", ...) (the UNet's blocks stay, so attention
    sites are still discovered), and the host's own calculate_input / calculate_denoised (including v-prediction) run
    unchanged: a round trip is exact only if our maths is right for the model's parameterisation.
    """

    def __init__(self, eps: torch.Tensor, model_sampling, v_prediction: bool):
        self.eps, self.sampling, self.v = eps, model_sampling, v_prediction

    def __call__(self, x, timesteps=None, context=None, y=None, control=None, transformer_options=None, **kwargs):
        eps = self.eps.to(x).expand_as(x)
        if not self.v:
            return eps
        sigma = self.sampling.sigma(timesteps).to(x).view(-1, 1, 1, 1)
        # v = alpha * eps - sigma_vp * x0 with x_vp = alpha * x0 + sigma_vp * eps (Salimans & Ho 2022, Eq. 10)
        alpha, sigma_vp = 1 / (1 + sigma**2).sqrt(), sigma / (1 + sigma**2).sqrt()
        x0 = (x - sigma_vp * eps) / alpha
        return alpha * eps - sigma_vp * x0


def constant_eps_patch(model, eps: torch.Tensor):
    """A clone of `model` whose UNet forward is ConstantEpsUNet (host parameterisation kept)."""
    import comfy.model_base

    m = model.clone()
    v = model.model.model_type == comfy.model_base.ModelType.V_PREDICTION
    m.add_object_patch("diffusion_model.forward", ConstantEpsUNet(eps, model.model.model_sampling, v))
    return m


# ------------------------------------------------------------------------------------------------ tiny Flux
# comfy.ldm.flux.model.Flux at toy widths (the real Flux-dev: hidden 3072, 24 heads, 19 double + 38 single blocks,
# T5-XXL context 4096, clip_l pooled vector 768). The rotary axes must add up to the head width (64 / 2 = 32).
FLUX_T5_DIM, FLUX_L_DIM = 48, L_DIM
TINY_FLUX_DIT = {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": FLUX_L_DIM,
    "context_in_dim": FLUX_T5_DIM, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1,
    "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "theta": 10000, "qkv_bias": True, "guidance_embed": True,
}
# T5 v1.1 encoder layout (gated GELU, relative position buckets) with the real 32128-token vocabulary of ComfyUI's
# shipped sentencepiece tokenizer, at toy widths.
TINY_T5_CONFIG = {
    "d_ff": 64, "d_kv": 16, "d_model": FLUX_T5_DIM, "decoder_start_token_id": 0, "dropout_rate": 0.0,
    "eos_token_id": 1, "dense_act_fn": "gelu_pytorch_tanh", "initializer_factor": 1.0, "is_encoder_decoder": True,
    "is_gated_act": True, "layer_norm_epsilon": 1e-06, "model_type": "t5", "num_decoder_layers": 2, "num_heads": 3,
    "num_layers": 2, "output_past": True, "pad_token_id": 0, "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False, "vocab_size": 32128,
}
TINY_FLUX_VAE_DDCONFIG = {"double_z": True, "z_channels": 16, "resolution": 64, "in_channels": 3, "out_ch": 3,
                          "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [],
                          "dropout": 0.0}


def _t5_config_file() -> str:
    path = os.path.join(scratch_dir(), "tiny_t5.json")
    if not os.path.exists(path):
        with open(path, "w") as f:
            json.dump(TINY_T5_CONFIG, f)
    return path


def _flux_classes():
    """(config class, text encoder class) of the tiny Flux; only ComfyUI 0.3.x has Flux."""
    import comfy.model_base
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.supported_models_base

    if not hasattr(comfy.supported_models, "Flux"):
        raise RuntimeError("this ComfyUI host (2024-03) has no Flux classes: the tiny Flux needs ComfyUI 0.3.x "
                           "(e.g. COMFYUI_PATH=../shared/hosts/comfyui-0.3.64)")
    import comfy.text_encoders.flux
    import comfy.text_encoders.t5

    class TinyT5(comfy.sd1_clip.SDClipModel):
        """comfy.text_encoders.sd3_clip.T5XXLModel (last layer, end token 1, pad 0) with the tiny T5 config."""

        def __init__(self, device="cpu", dtype=None, model_options=None):
            super().__init__(device=device, layer="last", layer_idx=None, textmodel_json_config=_t5_config_file(),
                             dtype=dtype, special_tokens={"end": 1, "pad": 0}, model_class=comfy.text_encoders.t5.T5,
                             enable_attention_masks=False, return_attention_masks=False,
                             model_options={**(model_options or {}), "model_name": "t5xxl"})

    class TinyFluxClipModel(comfy.text_encoders.flux.FluxClipModel):
        """FluxClipModel (T5 hidden states as context, clip_l pooled output as the vector) with tiny encoders."""

        def __init__(self, device="cpu", dtype=None, model_options=None):
            torch.nn.Module.__init__(self)
            self.clip_l = comfy.sd1_clip.SDClipModel(
                device=device, dtype=dtype, return_projected_pooled=False, model_options=model_options or {},
                textmodel_json_config=_config_file("flux_l", hidden_size=FLUX_L_DIM, projection_dim=FLUX_L_DIM))
            self.t5xxl = TinyT5(device=device, dtype=dtype, model_options=model_options)
            self.dtypes = {dtype}

    class TinyFlux(comfy.supported_models.Flux):
        """Flux-dev family (subclass: family checks see Flux; guidance embedding on) at toy widths."""

        unet_config = {"image_model": "flux", "guidance_embed": True}

        def clip_target(self, state_dict=None):
            return comfy.supported_models_base.ClipTarget(comfy.text_encoders.flux.FluxTokenizer, TinyFluxClipModel)

    return TinyFlux, comfy.model_base.Flux


def make_flux(seed: int = 0, qk_scale: float | None = None):
    """(MODEL, CLIP) of a tiny Flux-dev-shaped model (rectified flow, CONST sampling, guidance embedding).

    The seeded init zeroes 1-d parameters, so the QK-norm scales are 0 and every attention is uniform; `qk_scale` sets
    them (tests of attention edits use 1.0, the RMSNorm identity, so the attention depends on the tokens)."""
    import comfy.model_management as mm

    config_cls, model_cls = _flux_classes()
    cfg = config_cls(dict(TINY_FLUX_DIT))
    cfg.unet_config["dtype"] = torch.float32
    with torch.inference_mode():
        model = model_cls(cfg, device=mm.unet_offload_device())
        init_weights(model, seed)
        for module in model.modules():
            if qk_scale is not None and type(module).__name__ == "QKNorm":
                module.query_norm.scale.fill_(qk_scale)
                module.key_norm.scale.fill_(qk_scale)
    return _model_and_clip(model, cfg, seed)


def make_flux_vae(seed: int = 2):
    """A tiny 16-channel KL autoencoder (comfy.sd.VAE, x8 downscale) for the tiny Flux's latent format."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    with torch.no_grad():
        ae = AutoencoderKL(ddconfig=TINY_FLUX_VAE_DDCONFIG, embed_dim=16)
        init_weights(ae, seed)
        vae = comfy.sd.VAE(sd=ae.state_dict(), config={"params": {"ddconfig": TINY_FLUX_VAE_DDCONFIG,
                                                                  "embed_dim": 16}})
    vae.latent_channels = 16  # a config-built VAE keeps the SD default of 4 (used by the tiled fallback only)
    return vae


class FlowStandIn:
    """Stand-in Flux forward whose raw output is `velocity(x, timestep, guidance)` (a velocity in CONST space).

    Installed with ModelPatcher.add_object_patch("diffusion_model._forward", ...): the host's Flux.forward still runs
    its DIFFUSION_MODEL wrappers around it, and BaseModel._apply_model still applies CONST calculate_input /
    calculate_denoised, so exact-maths tests see the host's parameterisation unchanged.
    """

    def __init__(self, velocity):
        self.velocity = velocity

    def __call__(self, x, timestep, context=None, y=None, guidance=None, ref_latents=None, control=None,
                 transformer_options=None, **kwargs):
        return self.velocity(x, timestep, guidance)


def flow_patch(model, velocity):
    """A clone of a flow `model` whose diffusion model outputs velocity(x, timestep [B], guidance [B] or None)."""
    m = model.clone()
    m.add_object_patch("diffusion_model._forward", FlowStandIn(velocity))
    return m


def constant_velocity_patch(model, v: torch.Tensor):
    """A clone of a flow `model` whose velocity is the constant `v` (broadcast to the latent): x_sigma = x0 + sigma v
    is then an exact solution of the flow ODE, so Euler and RF-Solver round trips are exact."""
    return flow_patch(model, lambda x, t, g: v.to(x).expand_as(x).clone())


# ------------------------------------------------------------------------------------------------ tiny SD3 / SD3.5
# comfy.ldm.modules.diffusionmodules.mmdit.MMDiT (OpenAISignatureMMDITWrapper) at toy size. MMDiT derives its widths
# from `depth` (hidden 64 * depth, `depth` heads of 64): depth 2 gives 2 joint blocks, hidden 128. The real SD3-medium
# has depth 24, SD3.5-large 38 with RMS QK-norm (qk_norm "rms", as here). The context is the real 4096-wide one:
# ComfyUI's SD3ClipModel pads the clip_l + clip_g hidden states to 4096 (comfy/text_encoders/sd3_clip.py), and the
# context embedder is Linear(4096, hidden). Text encoders: tiny clip_l and clip_g with the real tokenizers and no T5
# (a real SD3 configuration: DualCLIPLoader type "sd3"), so the context is the 77 CLIP tokens.
SD3_POS_EMBED_MAX = 32  # pos_embed_max_size: latents up to 64x64 cells (patch 2)
SD3_HIDDEN = 64 * 2
TINY_SD3_DIT = {
    "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "adm_in_channels": L_DIM + G_DIM,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096,
                                                                        "out_features": SD3_HIDDEN}},
    "pos_embed_max_size": SD3_POS_EMBED_MAX, "num_patches": SD3_POS_EMBED_MAX**2, "pos_embed_scaling_factor": None,
    "qk_norm": "rms", "x_block_self_attn_layers": [], "mlp_ratio": 2.0,
}


def _sd3_classes():
    """(config class, model class) of the tiny SD3; only ComfyUI 0.3.x has SD3."""
    import comfy.model_base
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.supported_models_base

    if not hasattr(comfy.supported_models, "SD3"):
        raise RuntimeError("this ComfyUI host (2024-03) has no SD3 classes: the tiny SD3 needs ComfyUI 0.3.x "
                           "(e.g. COMFYUI_PATH=../shared/hosts/comfyui-0.3.64)")
    import comfy.text_encoders.sd3_clip

    class TinySD3ClipModel(comfy.text_encoders.sd3_clip.SD3ClipModel):
        """SD3ClipModel (clip_l + clip_g hidden states concatenated and padded to 4096, pooled l + g) with tiny
        encoders and no T5."""

        def __init__(self, device="cpu", dtype=None, model_options=None):
            torch.nn.Module.__init__(self)
            common = dict(device=device, dtype=dtype, layer="hidden", layer_idx=-2, layer_norm_hidden_state=False,
                          model_options=model_options or {})
            self.clip_l = comfy.sd1_clip.SDClipModel(
                textmodel_json_config=_config_file("l", hidden_size=L_DIM, projection_dim=L_DIM),
                return_projected_pooled=False, **common)
            self.clip_g = comfy.sd1_clip.SDClipModel(
                textmodel_json_config=_config_file("g", hidden_size=G_DIM, projection_dim=G_DIM),
                special_tokens={"start": 49406, "end": 49407, "pad": 0}, return_projected_pooled=True, **common)
            self.t5xxl = None
            self.t5_attention_mask = False
            self.dtypes = {dtype}

    class TinySD3(comfy.supported_models.SD3):
        """SD3 family (subclass: family checks see SD3; CONST sampling with shift 3) at toy widths."""

        def clip_target(self, state_dict=None):
            return comfy.supported_models_base.ClipTarget(comfy.text_encoders.sd3_clip.SD3Tokenizer,
                                                          TinySD3ClipModel)

    return TinySD3, comfy.model_base.SD3


def make_sd3(seed: int = 0, qk_scale: float | None = 1.0):
    """(MODEL, CLIP) of a tiny SD3.5-shaped model (rectified flow, CONST sampling, no guidance embedding, real CFG).

    As for make_flux, the seeded init zeroes 1-d parameters, so the RMS QK-norm weights would be 0 (q = k = 0:
    uniform attention); `qk_scale` sets them (1.0: the RMSNorm identity). The positional-embedding buffer, which
    ComfyUI leaves uninitialised, gets seeded values."""
    import comfy.model_management as mm

    config_cls, model_cls = _sd3_classes()
    cfg = config_cls(dict(TINY_SD3_DIT))
    cfg.unet_config["dtype"] = torch.float32
    with torch.inference_mode():
        model = model_cls(cfg, device=mm.unet_offload_device())
        init_weights(model, seed)
        dit = model.diffusion_model
        gen = torch.Generator().manual_seed(seed + 7)
        dit.pos_embed.copy_(torch.randn(dit.pos_embed.shape, generator=gen) * 0.1)
        for module in model.modules():
            if qk_scale is not None and type(module).__name__ == "SelfAttention" and hasattr(module, "ln_q"):
                for norm in (module.ln_q, module.ln_k):
                    if getattr(norm, "weight", None) is not None:
                        norm.weight.fill_(qk_scale)
    return _model_and_clip(model, cfg, seed)


class SD3StandIn:
    """Stand-in MMDiT forward whose raw output is `velocity(x, timestep)` (a velocity in CONST space); installed with
    add_object_patch("diffusion_model.forward", ...) (MMDiT has no inner _forward); BaseModel._apply_model still
    applies CONST calculate_input / calculate_denoised."""

    def __init__(self, velocity):
        self.velocity = velocity

    def __call__(self, x, timesteps, context=None, y=None, control=None, transformer_options=None, **kwargs):
        return self.velocity(x, timesteps, None)


def sd3_constant_velocity_patch(model, v: torch.Tensor):
    """A clone of a tiny SD3 whose velocity is the constant `v` (see constant_velocity_patch)."""
    m = model.clone()
    m.add_object_patch("diffusion_model.forward", SD3StandIn(lambda x, t, g: v.to(x).expand_as(x).clone()))
    return m
