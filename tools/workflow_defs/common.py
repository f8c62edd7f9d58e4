"""Building blocks shared by the workflow definitions."""

CHECKPOINT = "v1-5-pruned-emaonly.safetensors"  # placeholder SD1.5 name; the runner swaps in what you have
EXAMPLE_IMAGE = "attention_edit_example.jpg"  # copied into ComfyUI's input folder by the runner and the tests


# Short notes at the top of a stage's group: what the stage does, the knob to touch first, the cost.
LOAD_NOTE = ("Pick your SD1.5 checkpoint and photo (512 px works best). To edit a region, right-click Load Image > "
             "Open in MaskEditor and paint it.")
INVERT_NOTES = {
    "null_text": ("Finds the noise that redraws your photo. source_prompt: describe the photo. The slow step (about 10 "
                  "model passes per step); runs once, later edits reuse it."),
    "ddim": "Finds the noise that redraws your photo (one model pass per step). source_prompt: describe the photo.",
    "direct": ("Finds the noise that redraws your photo (one model pass per step, exact source branch). "
               "source_prompt: describe the photo."),
}


def loaders(g, image=True):
    """CheckpointLoaderSimple (+ LoadImage). Returns (ckpt, image_node or None)."""
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    img = g.node("LoadImage", image=EXAMPLE_IMAGE) if image else None
    if image:
        g.note(LOAD_NOTE, title="Load", stage="load")
    return ckpt, img


def save(g, vae_out, latent_out, prefix):
    """VAEDecode + SaveImage of a LATENT output."""
    decoded = g.node("VAEDecode", samples=latent_out, vae=vae_out)
    g.node("SaveImage", images=decoded["IMAGE"], filename_prefix=prefix)
    return decoded


def invert(g, ckpt, img, source_prompt, method="null_text", steps=50, cfg=7.5, **kw):
    if method in INVERT_NOTES:
        g.note(INVERT_NOTES[method], title="Invert", stage="invert")
    return g.node("AttnEditInvert", model=ckpt["MODEL"], clip=ckpt["CLIP"], image=img["IMAGE"], vae=ckpt["VAE"],
                  source_prompt=source_prompt, method=method, steps=steps, cfg=cfg, **kw)
