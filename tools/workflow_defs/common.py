"""Building blocks shared by the workflow definitions."""

CHECKPOINT = "v1-5-pruned-emaonly.safetensors"  # placeholder SD1.5 name; the runner swaps in what you have
EXAMPLE_IMAGE = "attention_edit_example.jpg"  # copied into ComfyUI's input folder by the runner and the tests


def loaders(g, image=True):
    """CheckpointLoaderSimple (+ LoadImage). Returns (ckpt, image_node or None)."""
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    img = g.node("LoadImage", image=EXAMPLE_IMAGE) if image else None
    return ckpt, img


def save(g, vae_out, latent_out, prefix):
    """VAEDecode + SaveImage of a LATENT output."""
    decoded = g.node("VAEDecode", samples=latent_out, vae=vae_out)
    g.node("SaveImage", images=decoded["IMAGE"], filename_prefix=prefix)
    return decoded


def invert(g, ckpt, img, source_prompt, method="null_text", steps=50, cfg=7.5, **kw):
    return g.node("AttnEditInvert", model=ckpt["MODEL"], clip=ckpt["CLIP"], image=img["IMAGE"], vae=ckpt["VAE"],
                  source_prompt=source_prompt, method=method, steps=steps, cfg=cfg, **kw)
