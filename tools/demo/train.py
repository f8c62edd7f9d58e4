"""Train the demo model (autoencoder, SD1-layout UNet, CLIP-layout text encoder) on the synthetic shapes world.

    python tools/demo/train.py [--out .tmp/demo_ckpt] [--seed 0] [--threads 2] [--max-hours H] [--device cpu|cuda]

Resumable: everything (weights, EMA, optimiser, step, RNG state) is saved to OUT/state.pt every --save-minutes
(atomic rename); rerunning the same command continues from there. Progress goes to OUT/train.log.

Stage 1 trains ComfyUI's AutoencoderKL (ch 32, ch_mult [1,1,1,1], 4-channel latent, x8 downscale) on full 128 px
scenes, then folds the training latents' per-channel mean/std into quant_conv / post_quant_conv so that ComfyUI's SD1
latent format (scale 0.18215) maps them to unit variance: the shipped VAE needs no custom latent format.
Stage 2 trains ComfyUI's UNetModel (SD1 layout at model_channels 32, one res block per level) jointly with ComfyUI's
SD1 CLIP text model (2 layers, width 64, ComfyUI's SD1 tokenizer) with the SD1 discrete noise schedule (linear betas
0.00085..0.012, 1000 steps, eps prediction), batch 16 (half of each batch re-uses the previous step's scene latents with new noise), AdamW 6e-4, 10% caption
dropout, EMA 0.999.

Uses ComfyUI's own classes from COMFYUI_PATH (default ../shared/hosts/comfyui-0.3.64 next to the repository, else the
CI host). Developer tooling: never imported by the pack.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(HERE))

from demo import world  # noqa: E402

LATENT_SCALE = 0.18215  # ComfyUI's SD15 latent format scale_factor
CONTEXT_DIM = 64
UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 16, "in_channels": 4, "out_channels": 4, "model_channels": 32,
    "num_res_blocks": [1, 1, 1, 1], "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 0],
    "transformer_depth_middle": 1, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 0, 0],
    "context_dim": CONTEXT_DIM, "use_spatial_transformer": True, "legacy": False, "use_linear_in_transformer": False,
    "adm_in_channels": None, "use_temporal_attention": False, "use_temporal_resblock": False,
    "num_heads": 4, "num_head_channels": -1,
}
CLIP_CONFIG = {
    "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
    "eos_token_id": 49407, "hidden_act": "quick_gelu", "hidden_size": CONTEXT_DIM, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 256, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
    "model_type": "clip_text_model", "num_attention_heads": 2, "num_hidden_layers": 2, "pad_token_id": 1,
    "projection_dim": CONTEXT_DIM, "torch_dtype": "float32", "vocab_size": 49408,
}
VAE_DDCONFIG = {
    "double_z": True, "z_channels": 4, "resolution": 128, "in_channels": 3, "out_ch": 3, "ch": 32,
    "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
}
VAE_STEPS, VAE_BATCH, VAE_LR, VAE_KL = 160, 4, 1.5e-3, 1e-6  # small: CPU time is scarce here (see docs/demo_model.md)
VAE_MORE_LR = 5e-4  # --more-vae-steps
# Reconstruction loss weight of object pixels (those away from the scene's plain background): objects cover ~10% of a
# scene, so an unweighted loss is dominated by the background and a short run confuses red/orange/yellow, blue/purple.
VAE_OBJECT_WEIGHT = 8.0
BATCH, LR, WEIGHT_DECAY, WARMUP, DROPOUT, EMA_DECAY = 16, 6e-4, 0.01, 100, 0.1, 0.999
# Cross-attention localisation loss weight (FastComposer, Xiao et al. 2023, Sec. 3.4): SD's word maps sit on their
# objects after web-scale training; this toy model's stayed flat without the loss (208k samples, colours learned), so
# the masks that P2P's local blend and Mask from Attention read from them covered the whole picture. The loss asks
# each object word (colour and shape) to put its attention mass on its own object (ground truth from the world
# generator); 0 switches it off.
LOCALIZE_WEIGHT = 0.02
# Coverage term of the localisation loss (--localize-coverage; 0 = off, as in the shipped model's steps up to 18,156,
# which from there on trained with 1.0: docs/demo_model.md): the mass share alone is best met by piling a word's
# attention on one cell inside its object (seen at step 18,156: maps on a single 32 px cell, a quarter of the circle);
# the total variation distance between the word's normalised map and the object's normalised mask asks the map to
# spread evenly over the whole object.
LOCALIZE_COVERAGE = 0.0
LOCALIZE_MIN_GRID = 4  # cross-attention layers on grids of at least 4x4 (the 2x2 middle block is too coarse)
FRESH = BATCH // 2  # new scenes per step; the other half are the previous step's scenes (latents reused, new noise)
LOG = logging.getLogger("demo.train")


def comfy_path() -> str:
    path = os.environ.get("COMFYUI_PATH") or os.path.join(os.path.dirname(REPO), "shared", "hosts", "comfyui-0.3.64")
    if not os.path.isfile(os.path.join(path, "nodes.py")):
        sys.path.insert(0, os.path.join(REPO, "tools"))
        import comfy_host

        path = comfy_host.find_comfy_path()
    return os.path.abspath(path)


def import_comfy(device: str) -> None:
    path = comfy_path()
    if path not in sys.path:
        sys.path.insert(0, path)
    from comfy.cli_args import args

    if device == "cpu":
        args.cpu = True
    args.use_pytorch_cross_attention = True  # torch SDPA (the CPU default, sub-quadratic attention, is slower)


def init_weights(module: torch.nn.Module, seed: int) -> None:
    """LeCun-normal weights, zero biases, unit norms (ComfyUI creates layers uninitialised)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in module.modules():
            for name, p in mod.named_parameters(recurse=False):
                if isinstance(mod, torch.nn.GroupNorm | torch.nn.LayerNorm):
                    p.fill_(1.0 if name == "weight" else 0.0)
                elif isinstance(mod, torch.nn.Embedding):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
                elif p.ndim >= 2:
                    p.copy_(torch.randn(p.shape, generator=gen) / max(1, p[0].numel()) ** 0.5)
                else:
                    p.zero_()


def build_vae():
    from comfy.ldm.models.autoencoder import AutoencoderKL

    return AutoencoderKL(ddconfig=dict(VAE_DDCONFIG), embed_dim=4)


def build_unet():
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(**UNET_CONFIG, dtype=torch.float32, operations=comfy.ops.disable_weight_init)
    return unet


def zero_init_unet(unet) -> None:
    """The LDM zero_module() layers: output conv and every transformer's proj_out start at zero."""
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if name.startswith("out.2.") or ".proj_out." in name or (".out_layers.3." in name):
                p.zero_()


def build_clip():
    """ComfyUI's SD1 text model; for training its layers run their residual adds out of place (ComfyUI's `x += ...`
    breaks autograd). Same parameters, same maths."""
    import comfy.clip_model
    import comfy.ops
    import comfy.sd1_clip

    class TrainableCLIPLayer(comfy.clip_model.CLIPLayer):
        def forward(self, x, mask=None, optimized_attention=None):
            x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
            return x + self.mlp(self.layer_norm2(x))

    clip = comfy.sd1_clip.SDClipModel(textmodel_json_config=dict(CLIP_CONFIG), freeze=False,
                                      model_options={"custom_operations": comfy.ops.disable_weight_init})
    for layer in clip.transformer.text_model.encoder.layers:
        layer.__class__ = TrainableCLIPLayer
    return clip


def tokenizer():
    import comfy.sd1_clip

    return comfy.sd1_clip.SDTokenizer(embedding_size=CONTEXT_DIM)


class Captions:
    """caption -> token id list (77), cached: the grammar is finite."""

    def __init__(self):
        self.tok = tokenizer()
        self.cache: dict[str, list[int]] = {}

    def __call__(self, text: str) -> list[int]:
        if text not in self.cache:
            chunks = self.tok.tokenize_with_weights(text)
            self.cache[text] = [int(t[0]) for t in chunks[0]]
        return self.cache[text]


def to_tensor(images: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).to(device) * 2 - 1


def schedule(device) -> torch.Tensor:
    """SD1 discrete schedule: alphas_cumprod of linear-in-sqrt betas 0.00085..0.012, 1000 steps (ComfyUI's default)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float().to(device)


def reconstruction_loss(rec: torch.Tensor, x: torch.Tensor, scenes, object_weight: float = VAE_OBJECT_WEIGHT
                        ) -> torch.Tensor:
    """L1 + MSE with object pixels weighted `object_weight` (normalised by the mean weight); x, rec in [-1, 1]."""
    bg = torch.tensor([world.BACKGROUNDS[s.background] for s in scenes], dtype=x.dtype, device=x.device)
    bg = (bg / 255.0 * 2 - 1).view(-1, 3, 1, 1)
    w = 1 + (object_weight - 1) * ((x - bg).abs().sum(1, keepdim=True) > 0.1).to(x.dtype)
    return ((rec - x).abs() * w).mean() / w.mean() + ((rec - x).pow(2) * w).mean() / w.mean()


def vae_moments(vae, x):
    h = vae.quant_conv(vae.encoder(x))
    return h.chunk(2, dim=1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.clamp(-1, 1) - b) / 2).pow(2).mean().item()
    return 10 * math.log10(1 / max(mse, 1e-12))


@torch.no_grad()
def fold_latent_stats(vae, seed: int, device, n: int = 256) -> dict:
    """Rescale quant_conv / post_quant_conv so the encoder's latent mean has per-channel mean 0 and std
    1 / LATENT_SCALE (unit variance after ComfyUI's SD1 process_in); decoding is unchanged."""
    imgs = world.batch(seed + 7777, 0, n)[0]
    mus = torch.cat([vae_moments(vae, to_tensor(imgs[i:i + 64], device))[0] for i in range(0, n, 64)])
    mu = mus.mean(dim=(0, 2, 3))
    s = 1.0 / (LATENT_SCALE * mus.std(dim=(0, 2, 3)))
    q, p = vae.quant_conv, vae.post_quant_conv
    pw = p.weight[:, :, 0, 0].clone()
    p.bias.add_(pw @ mu)
    p.weight.div_(s.view(1, -1, 1, 1))
    q.weight[:4].mul_(s.view(-1, 1, 1, 1))
    q.bias[:4].sub_(mu).mul_(s)
    q.bias[4:].add_(2 * torch.log(s))
    return {"mean": mu.tolist(), "scale": s.tolist()}


def save(state: dict, out: str) -> None:
    tmp = os.path.join(out, "state.pt.tmp")
    torch.save(state, tmp)
    os.replace(tmp, os.path.join(out, "state.pt"))


def train_vae(args, device, state: dict, out: str) -> None:
    """Stage 1 from scratch, or (--more-vae-steps N) N more steps on the state's folded VAE at VAE_MORE_LR, re-folded
    after; the diffusion weights are then dropped (their latent space changed)."""
    more = "vae" in state
    torch.manual_seed(args.seed + (state.get("vae_steps", VAE_STEPS) if more else 0))
    vae = build_vae().to(device)
    if more:
        vae.load_state_dict(state["vae"])
    else:
        init_weights(vae, args.seed)
    base_lr = VAE_MORE_LR if more else VAE_LR
    opt = torch.optim.Adam(vae.parameters(), lr=base_lr)
    started = time.time()
    total = args.more_vae_steps if more else args.vae_steps
    first = state.get("vae_steps", VAE_STEPS) if more else 0
    for step in range(total):
        images, _, scenes = world.batch(args.seed + 1000, (first + step) * VAE_BATCH, VAE_BATCH)
        x = to_tensor(images, device)
        mean, logvar = vae_moments(vae, x)
        logvar = logvar.clamp(-30, 20)
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)
        rec = vae.decoder(vae.post_quant_conv(z))
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
        loss = reconstruction_loss(rec, x, scenes, args.vae_object_weight) + VAE_KL * kl
        lr = base_lr * min(1.0, (step + 1) / (20 if more else 100)) * (0.1 if step > 0.8 * total else 1.0)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == total - 1:
            LOG.info("vae step %d loss %.4f psnr %.2f dB kl %.1f (%.0fs)", step, loss.item(), psnr(rec, x), kl.item(),
                     time.time() - started)
    vae.eval()
    with torch.no_grad():
        x = to_tensor(world.batch(args.seed + 9999, 0, 64)[0], device)
        rec = vae.decode(vae.encode(x))
        vae_psnr = psnr(rec, x)
    stats = fold_latent_stats(vae, args.seed, device)
    with torch.no_grad():
        rec2 = vae.decode(vae.encode(x))
    LOG.info("vae done: held-out PSNR %.2f dB (after fold %.2f dB), latent stats %s, %.0fs", vae_psnr,
             psnr(rec2, x), json.dumps(stats), time.time() - started)
    for key in ("model", "opt", "ema", "step", "rng", "diffusion_seconds", "localize_from_step",
                "coverage_from_step"):
        state.pop(key, None)
    state.update({"stage": "diffusion", "vae": vae.state_dict(), "vae_psnr": vae_psnr, "latent_stats": stats,
                  "vae_seconds": state.get("vae_seconds", 0) + time.time() - started, "vae_steps": first + total})
    save(state, out)


def word_token_positions(caption: str, captions: Captions) -> list[int]:
    """Token index of each word of `caption` (index 0 is the start token; every word of the grammar is one token)."""
    words = caption.split()
    ids = captions(caption)
    for i, w in enumerate(words):
        if captions(w)[1] != ids[1 + i] or captions(w)[2] != captions("")[1]:
            raise ValueError(f"word {w!r} of {caption!r} is not one token: the localisation loss needs one-token words")
    return [1 + i for i in range(len(words))]


def object_word_tokens(scene: world.Scene, captions: Captions) -> list[tuple[list[int], np.ndarray]]:
    """(token positions of the object's colour and shape words, ground-truth mask [128, 128]) per object; objects in
    caption order (left to right), as world.caption writes them."""
    positions = word_token_positions(scene.caption, captions)
    masks = world.render(scene)[1]
    order = sorted(range(len(scene.objects)), key=lambda i: scene.objects[i].cx)
    out = []
    for k, i in enumerate(order):  # "a red circle and a blue square on ...": words 1, 2 then 5, 6
        out.append(([positions[1 + 4 * k], positions[2 + 4 * k]], masks[i]))
    return out


class CrossAttentionRecorder:
    """attn2 replacement (ComfyUI's transformer_options["patches_replace"]["attn2"]) that computes softmax(QK^T/sqrt d)V
    as the default attention does and keeps each call's head-averaged probabilities [B, N, 77] for the loss."""

    def __init__(self):
        self.maps: list[torch.Tensor] = []

    def __call__(self, q, k, v, extra_options):
        h = extra_options["n_heads"]
        b, n, c = q.shape
        d = c // h
        qh, kh, vh = (t.view(b, -1, h, d).transpose(1, 2) for t in (q, k, v))
        probs = (qh @ kh.transpose(-1, -2) * d**-0.5).softmax(-1)
        self.maps.append(probs.mean(1))
        return (probs @ vh).transpose(1, 2).reshape(b, n, c)

    def transformer_options(self, unet) -> dict:
        keys = [("input", i) for i in range(len(unet.input_blocks))] + [("middle", 0)] + [
            ("output", i) for i in range(len(unet.output_blocks))]
        return {"patches_replace": {"attn2": {key: self for key in keys}}}


def localisation_loss(maps: list[torch.Tensor], targets: list[list[tuple[list[int], np.ndarray]]],
                      coverage: float = LOCALIZE_COVERAGE) -> torch.Tensor:
    """1 - (share of each object word's attention mass that falls on its object), plus `coverage` x the total variation
    distance between the word's normalised map and its object's normalised mask (0 when the map covers the object
    evenly, 1 when it misses it), averaged over words, objects, samples and layers on grids >= LOCALIZE_MIN_GRID;
    `targets[i]` is empty for a sample without caption."""
    terms = []
    for probs in maps:
        grid = int(round(probs.shape[1] ** 0.5))
        if grid < LOCALIZE_MIN_GRID:
            continue
        for i, objects in enumerate(targets):
            for tokens, mask in objects:
                m = torch.from_numpy(mask).float()[None, None]
                m = torch.nn.functional.adaptive_avg_pool2d(m, grid).flatten().to(probs)
                a = probs[i, :, tokens]  # [N, words]
                mass = a.sum(0).clamp_min(1e-8)
                term = 1 - (a * m[:, None]).sum(0) / mass
                if coverage:
                    target = (m / m.sum().clamp_min(1e-8))[:, None]
                    term = term + coverage * (1 - torch.minimum(a / mass, target).sum(0))
                terms.append(term)
    return torch.cat(terms).mean() if terms else maps[0].new_zeros(())


def ema_update(ema: dict, params: dict, decay: float) -> None:
    with torch.no_grad():
        for k, v in params.items():
            ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)


def train_diffusion(args, device, state: dict, out: str) -> None:
    vae = build_vae().to(device)
    vae.load_state_dict(state["vae"])
    vae.eval().requires_grad_(False)
    unet, clip = build_unet().to(device), build_clip().to(device)
    params = {**{"unet." + k: v for k, v in unet.named_parameters()},
              **{"clip." + k: v for k, v in clip.named_parameters()}}
    opt = torch.optim.AdamW(list(params.values()), lr=LR, weight_decay=WEIGHT_DECAY)
    if "model" in state:
        unet.load_state_dict(state["model"]["unet"])
        clip.load_state_dict(state["model"]["clip"])
        opt.load_state_dict(state["opt"])
        ema = {k: v.to(device) for k, v in state["ema"].items()}
        torch.set_rng_state(state["rng"])
        step = state["step"]
        LOG.info("resumed at step %d (%d samples)", step, step * BATCH)
    else:
        init_weights(unet, args.seed + 1)
        zero_init_unet(unet)
        init_weights(clip, args.seed + 2)
        torch.manual_seed(args.seed + 3)
        ema = {k: v.detach().clone() for k, v in params.items()}
        step = 0
        n_unet = sum(p.numel() for p in unet.parameters())
        LOG.info("diffusion start: unet %.2fM params, clip %.2fM params", n_unet / 1e6,
                 sum(p.numel() for p in clip.parameters()) / 1e6)
    unet.train()
    clip.train()
    captions = Captions()
    empty = captions("")
    acp = schedule(device)
    started, last_save = time.time(), time.time()
    elapsed0 = state.get("diffusion_seconds", 0.0)
    losses, losses_loc = [], []
    gen = torch.Generator().manual_seed(args.seed + 5)
    if args.localize_weight and "localize_from_step" not in state:
        state["localize_from_step"] = state.get("step", 0)
    if args.localize_weight and args.localize_coverage and "coverage_from_step" not in state:
        state["coverage_from_step"] = state.get("step", 0)
    prev = None
    while True:
        imgs, caps, scenes = world.batch(args.seed, step * FRESH, FRESH if prev else BATCH)
        with torch.no_grad():
            fresh = vae.encode(to_tensor(imgs, device)) * LATENT_SCALE
        x0, all_caps, all_scenes = ((torch.cat([fresh, prev[0]]), caps + prev[1], scenes + prev[2]) if prev
                                    else (fresh, caps, scenes))
        prev = (fresh[:FRESH], caps[:FRESH], scenes[:FRESH])
        gen.manual_seed(args.seed * 1_000_003 + step)
        drop = torch.rand(BATCH, generator=gen) < DROPOUT
        tokens = [empty if d else captions(c) for c, d in zip(all_caps, drop.tolist(), strict=True)]
        t = torch.randint(0, 1000, (BATCH,), device=device)
        noise = torch.randn_like(x0)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        ctx = clip(tokens)[0]
        if args.localize_weight:
            recorder = CrossAttentionRecorder()
            pred = unet(xt, timesteps=t.float(), context=ctx, transformer_options=recorder.transformer_options(unet))
            targets = [[] if d else object_word_tokens(s, captions) for s, d in zip(all_scenes, drop.tolist(), strict=True)]
            loc = localisation_loss(recorder.maps, targets, args.localize_coverage)
        else:
            pred = unet(xt, timesteps=t.float(), context=ctx)
            loc = pred.new_zeros(())
        loss = (pred - noise).pow(2).mean()
        losses_loc.append(loc.item())
        loss_total = loss + args.localize_weight * loc
        for g in opt.param_groups:
            g["lr"] = LR * min(1.0, (step + 1) / WARMUP)
        opt.zero_grad(set_to_none=True)
        loss_total.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        step += 1
        ema_update(ema, params, min(EMA_DECAY, (1 + step) / (10 + step)))
        losses.append(loss.item())
        now = time.time()
        if step % 25 == 0:
            LOG.info("step %d samples %d loss %.4f localisation %.3f (%.2f samples/s, %.0f s total)", step,
                     step * BATCH, float(np.mean(losses)), float(np.mean(losses_loc)), 25 * BATCH / max(1e-6, now - getattr(train_diffusion, "_t", started)),
                     elapsed0 + now - started)
            train_diffusion._t = now
            losses, losses_loc = [], []
        done = args.max_hours and elapsed0 + now - started > args.max_hours * 3600
        if now - last_save > args.save_minutes * 60 or done or (args.max_steps and step >= args.max_steps):
            state.update({"model": {"unet": unet.state_dict(), "clip": clip.state_dict()}, "opt": opt.state_dict(),
                          "ema": ema, "step": step, "rng": torch.get_rng_state(),
                          "diffusion_seconds": elapsed0 + now - started})
            save(state, out)
            last_save = now
            LOG.info("saved %s at step %d", os.path.join(out, "state.pt"), step)
            if done or (args.max_steps and step >= args.max_steps):
                return


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(REPO, ".tmp", "demo_ckpt"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: on a shared, busy CPU two OpenMP threads ran 20x slower)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--save-minutes", type=float, default=4.0)
    p.add_argument("--max-hours", type=float, default=0.0, help="stop after this much diffusion training (0: never)")
    p.add_argument("--max-steps", type=int, default=0, help="stop at this diffusion step (0: never)")
    p.add_argument("--vae-steps", type=int, default=VAE_STEPS)
    p.add_argument("--more-vae-steps", type=int, default=0,
                   help="continue the saved VAE for this many steps, re-fold, and restart the diffusion stage")
    p.add_argument("--vae-object-weight", type=float, default=VAE_OBJECT_WEIGHT,
                   help="VAE loss weight of object pixels (1: unweighted, as the shipped VAE's first 1260 steps)")
    p.add_argument("--localize-weight", type=float, default=LOCALIZE_WEIGHT,
                   help="cross-attention localisation loss weight (0: off, as the shipped model's first 13,367 steps)")
    p.add_argument("--localize-coverage", type=float, default=LOCALIZE_COVERAGE,
                   help="weight of the localisation loss's coverage term (0: off; the shipped model used 1.0 from "
                        "step 18,156)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    logging.basicConfig(filename=os.path.join(args.out, "train.log"), level=logging.INFO,
                        format="%(asctime)s %(message)s")
    logging.getLogger().addHandler(logging.StreamHandler())
    torch.set_num_threads(args.threads)
    import_comfy(args.device)
    device = torch.device(args.device)
    path = os.path.join(args.out, "state.pt")
    state = torch.load(path, map_location=device, weights_only=True) if os.path.exists(path) else {
        "stage": "vae", "seed": args.seed, "command": " ".join(sys.argv)}
    LOG.info("command: %s (comfy %s, device %s, threads %d)", " ".join(sys.argv), comfy_path(), device, args.threads)
    if state["stage"] == "vae" or args.more_vae_steps:
        train_vae(args, device, state, args.out)
    train_diffusion(args, device, state, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
