"""Export a training checkpoint (tools/demo/train.py's state.pt) to the shipped demo weights.

    python tools/demo/export.py [--state .tmp/demo_ckpt/state.pt] [--out models/demo/attnedit_demo.safetensors]

Writes one safetensors file: the EMA UNet ("unet."), the EMA text encoder ("clip.", ComfyUI CLIPTextModel keys) and
the autoencoder ("vae.", ComfyUI AutoencoderKL keys, latent statistics already folded in), stored as float16 (the
loader computes in float32 on CPU). Only the token-embedding rows of the demo vocabulary are stored
("clip.sparse_token_ids" / "clip.sparse_token_rows"); the loader puts zeros in the other rows. The encoder's log-variance is pinned to
-30 so that both hosts' VAE encoders (ComfyUI 2024-03 samples the posterior, 0.3.x takes its mean) give the same latent.
The configurations travel in the file's metadata, so the loader needs nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from demo import train, world  # noqa: E402

DEFAULT_OUT = os.path.join(train.REPO, "models", "demo", "attnedit_demo.safetensors")
LOGVAR_PIN = -30.0  # DiagonalGaussianDistribution clamps logvar at -30: posterior std e^-15, i.e. deterministic


def vocabulary_ids() -> list[int]:
    """Every token id the world's grammar can produce, plus start/end (ComfyUI's SD1 tokenizer)."""
    train.import_comfy("cpu")
    tok = train.tokenizer()
    words = ["a", "an", "and", "on", "background", *world.SHAPES, *world.COLOURS, *world.BACKGROUNDS]
    ids = {49406, 49407}
    for w in words:
        ids.update(int(t[0]) for t in tok.tokenize_with_weights(w)[0])
    return sorted(ids)


def export(state_path: str, out: str) -> dict:
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    if "ema" not in state:
        raise SystemExit(f"{state_path} has no diffusion weights yet (stage {state['stage']!r}); let training run on")
    ema = state["ema"]
    tensors = {}
    for k, v in ema.items():
        if k.startswith("unet."):
            tensors[k] = v
        elif k.startswith("clip.transformer."):
            tensors["clip." + k[len("clip.transformer."):]] = v
    emb_key = "clip.text_model.embeddings.token_embedding.weight"
    ids = vocabulary_ids()
    full = tensors.pop(emb_key)
    tensors["clip.sparse_token_ids"] = torch.tensor(ids, dtype=torch.int64)
    tensors["clip.sparse_token_rows"] = full[ids]
    vae = {k: v.clone() for k, v in state["vae"].items()}
    vae["quant_conv.weight"][4:] = 0
    vae["quant_conv.bias"][4:] = LOGVAR_PIN
    tensors.update({"vae." + k: v for k, v in vae.items()})
    tensors = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    meta = {
        "format": "attnedit-demo-1",
        "unet_config": json.dumps(train.UNET_CONFIG), "clip_config": json.dumps(train.CLIP_CONFIG),
        "vae_ddconfig": json.dumps(train.VAE_DDCONFIG), "vocab_size": str(train.CLIP_CONFIG["vocab_size"]),
        "step": str(state["step"]), "samples": str(state["step"] * train.BATCH), "seed": str(state["seed"]),
        "diffusion_seconds": f"{state.get('diffusion_seconds', 0):.0f}", "vae_psnr_db": f"{state['vae_psnr']:.2f}",
    }
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_file(tensors, out, metadata=meta)
    return meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--state", default=os.path.join(train.REPO, ".tmp", "demo_ckpt", "state.pt"))
    p.add_argument("--out", default=DEFAULT_OUT)
    args = p.parse_args(argv)
    meta = export(args.state, args.out)
    print(f"{args.out}: step {meta['step']}, {meta['samples']} samples, {os.path.getsize(args.out) / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
