"""Flux workflows (ComfyUI 0.3.x): flow inversion, Prompt-to-Prompt word swap with local blend on the joint attention,
a mask from Flux's attention, and CPAM's (KV-Edit-style) background-preserving edit. 1024 px."""

from .common import EXAMPLE_IMAGE, save
from .cpam import CAT_BOX

FLUX_CHECKPOINT = "flux1-dev-fp8.safetensors"  # placeholder Flux-dev checkpoint (model + CLIP + VAE in one file)
SOURCE = "a photo of a cat sitting on a sofa"
TARGET = "a photo of a dog sitting on a sofa"
STEPS = 28  # Flux-dev's usual step count
LOAD_NOTE = ("Pick your Flux-dev checkpoint (a single file with model, T5 + CLIP-L and VAE, e.g. the fp8 one) and "
             "photo; 1024 px works best. Needs ComfyUI 0.3.x.")
INVERT_NOTE = ("Finds the noise that redraws your photo by integrating the rectified-flow ODE backwards (rf_solver: "
               "2 model passes per step, closer than flow_euler). cfg 1.0 with Flux's guidance embedding (3.5); "
               "source_prompt: describe the photo.")


def _flux_loaders(g):
    """Flux checkpoint + the example picture scaled to 1024x1024."""
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=FLUX_CHECKPOINT)
    img = g.node("LoadImage", image=EXAMPLE_IMAGE)
    scaled = g.node("ImageScale", image=img["IMAGE"], upscale_method="lanczos", width=1024, height=1024,
                    crop="center")
    g.note(LOAD_NOTE, title="Load", stage="load")
    return ckpt, scaled


def _flux_invert(g, ckpt, img, method="rf_solver"):
    g.note(INVERT_NOTE, title="Invert", stage="invert")
    return g.node("AttnEditInvert", model=ckpt["MODEL"], clip=ckpt["CLIP"], image=img["IMAGE"], vae=ckpt["VAE"],
                  source_prompt=SOURCE, method=method, steps=STEPS, cfg=1.0, guidance=3.5)


def _box_mask(g):
    """The cat box of the example picture at 1024x1024 (core SolidMask + MaskComposite)."""
    canvas = g.node("SolidMask", value=0.0, width=1024, height=1024)
    box = g.node("SolidMask", value=1.0, width=2 * CAT_BOX["width"], height=2 * CAT_BOX["height"])
    return g.node("MaskComposite", title="object mask (replace with yours)", destination=canvas["MASK"],
                  source=box["MASK"], x=2 * CAT_BOX["x"], y=2 * CAT_BOX["y"], operation="add")


def flux_word_swap_local_blend(g):
    ckpt, img = _flux_loaders(g)
    inv = _flux_invert(g, ckpt, img)
    hook = g.node("AttnEditAttentionHook", model=ckpt["MODEL"], clip=ckpt["CLIP"], source_prompt=SOURCE,
                  target_prompt=TARGET, mode="replace", cross_replace=0.8, self_replace=0.4, local_blend="cat, dog")
    edit = g.node("AttnEditEditSampler", model=hook["model"], inversion=inv["inversion"])
    save(g, ckpt["VAE"], edit["latent"], "attnedit_flux_word_swap")
    g.note("Flux: Prompt-to-Prompt word swap on the joint attention, with local blend.\n"
           "Invert Image (rf_solver, 28 steps, cfg 1, guidance 3.5) -> Prompt-to-Prompt Attention Hook (replace "
           "cat -> dog, cross 0.8, self 0.4, local blend 'cat, dog') -> Attention Edit Sampler.\n"
           "- In Flux every block attends over the T5 words and the image together: the image's attention to the "
           "words is the map that is swapped; self_replace injects the source's image-to-image attention in Stable "
           "Flow's vital layers (self_replace_all_layers: every block).\n"
           "- Words are T5 words: write them as the prompt spells them. Prompts must fit T5's 256 tokens.\n"
           "- local blend keeps everything outside the words' attention identical to the source (blend_threshold: "
           "lower = larger region).")


def flux_attention_mask(g):
    ckpt, img = _flux_loaders(g)
    inv = _flux_invert(g, ckpt, img, method="flow_euler")
    mask = g.node("AttnEditMaskFromAttention", attention=inv["attention"], image=img["IMAGE"], mode="local blend",
                  words="cat")
    g.node("PreviewImage", images=mask["preview"])
    g.node("AttnEditAttentionPreview", attention=inv["attention"], image=img["IMAGE"], branch="source",
           words="cat, sofa")
    g.node("SaveImage", images=g.node("MaskToImage", mask=mask["mask"])["IMAGE"],
           filename_prefix="attnedit_flux_attention_mask")
    g.note("Flux: a mask from the model's own attention.\n"
           "Invert Image (flow_euler, one pass per step) records the image's attention to each T5 word in every "
           "Flux block (maps at 1/16 of the image: 64x64 at 1024 px).\n"
           "- Mask from Attention, mode local blend, words 'cat': Prompt-to-Prompt's mask of the word (threshold "
           "0.3: lower = larger; dilation in attention cells). Use the MASK with core inpainting or the pack's "
           "nodes.\n"
           "- Attention Heat Maps: one picture per word.")


def flux_cpam_background(g):
    ckpt, img = _flux_loaders(g)
    inv = _flux_invert(g, ckpt, img)
    mask = _box_mask(g)
    g.node("PreviewImage", images=g.node("MaskToImage", mask=mask["MASK"])["IMAGE"])
    cpam = g.node("AttnEditCPAMSelfAttn", model=ckpt["MODEL"], inversion=inv["inversion"], clip=ckpt["CLIP"],
                  source_mask=mask["MASK"], target_prompt=TARGET, strategy="replace object")
    edit = g.node("AttnEditEditSampler", model=cpam["model"], inversion=inv["inversion"],
                  source_branch="pin to inversion")
    save(g, ckpt["VAE"], edit["latent"], "attnedit_flux_background_kept")
    g.note("Flux: edit inside a mask, background kept exactly (CPAM node, KV-Edit style).\n"
           "strategy 'replace object': outside the (slightly expanded) mask the edited image takes the source's "
           "image keys/values in every Flux block and the source latent after every step, so the background is "
           "the inversion's own; inside, the target prompt redraws the object. 'change background' does the "
           "opposite (the mask is what to keep).\n"
           "- Mask: a box over the cat at 1024 px; paint your own (Load Image -> Open in MaskEditor) or use SAM.\n"
           "- On Flux only the mask, mask_expand and the strategy are used; the other CPAM knobs are for SD.")


WORKFLOWS = {"30_flux_word_swap_local_blend": flux_word_swap_local_blend,
             "31_flux_attention_mask": flux_attention_mask,
             "32_flux_cpam_background": flux_cpam_background}
