"""MAG-Edit workflow: image + mask -> null-text inversion -> P2P refine -> MAG-Edit Guidance -> edit sampler -> decode."""

from .common import invert, loaders, save

SOURCE = "a photo of a cat sitting on a sofa"
TARGET = "a photo of a white cat sitting on a sofa"


def mag_chain(g, ckpt, img, mask, prefix, cfg=7.5, max_iterations=15, guidance_steps=25):
    """null-text inversion -> P2P refine -> MAG-Edit Guidance -> edit sampler -> decode + heat maps of 'white'."""
    inv = invert(g, ckpt, img, SOURCE, method="null_text", cfg=cfg)
    hook = g.node("AttnEditAttentionHook", model=ckpt["MODEL"], clip=ckpt["CLIP"], source_prompt=SOURCE,
                  target_prompt=TARGET, mode="refine", cross_replace=0.8, self_replace=0.5)
    guided = g.node("AttnEditMAGGuidance", model=hook["model"], inversion=inv["inversion"], mask=mask["MASK"],
                    target_words="white", constraint="token_ratio", max_iterations=max_iterations,
                    guidance_steps=guidance_steps, scale=2.5, negative_words="", blend_steps=15)
    edit = g.node("AttnEditEditSampler", model=guided["model"], inversion=inv["inversion"])
    decoded = save(g, ckpt["VAE"], edit["latent"], prefix)
    g.node("AttnEditAttentionPreview", attention=edit["attention"], image=decoded["IMAGE"], branch="target",
           words="white, cat")


def mag_edit(g):
    ckpt, img = loaders(g)
    # A painted-style mask over the cat of the example picture (512x512): a white box on black. Replace it by a
    # painted mask (LoadImage -> Open in MaskEditor -> MASK output) or a SAM mask for your own picture.
    canvas = g.node("SolidMask", value=0.0, width=512, height=512)
    box = g.node("SolidMask", value=1.0, width=170, height=290)
    mask = g.node("MaskComposite", destination=canvas["MASK"], source=box["MASK"], x=180, y=145, operation="add")
    g.node("PreviewImage", images=g.node("MaskToImage", mask=mask["MASK"])["IMAGE"])
    mag_chain(g, ckpt, img, mask, "attnedit_mag_edit")
    g.note("MAG-Edit (Mao et al. 2024): put the edit where the mask is (guided inside it, the source kept outside it).\n"
           "1. Mask: here a box over the cat (Solid Mask + Mask Composite). Any MASK works: paint one (LoadImage -> "
           "right-click -> Open in MaskEditor, use its MASK output) or use a SAM node.\n"
           "2. Invert Image: null_text, 50 steps, cfg 7.5 (the paper's setting).\n"
           "3. Prompt-to-Prompt Attention Hook: mode refine (MAG-Edit needs it), cross_replace 0.8, self_replace 0.5; "
           "the target prompt adds the new word ('white').\n"
           "4. MAG-Edit Guidance: target_words = the NEW word(s) of the target prompt (weights: 'white=0.7, "
           "fluffy=0.3'). constraint token_ratio for colour/texture, spatial_ratio for stronger object/shape "
           "edits. max_iterations 15 x guidance_steps 25 as in the paper (lower both for speed: colour edits often "
           "need only ~10 steps). guidance_steps and blend_steps count steps of the paper's 50-step run and scale to "
           "the inversion's steps (25 = the first half: 10 of 20 steps). scale 2.5 = step size (higher = stronger, "
           "more artefacts). blend_steps 15: the last 15 of 50 steps copy everything outside the mask from the "
           "source. negative_words lowers words' attention in the mask (put them in negative_words_prompt and "
           "connect clip when they are also in the source prompt). word_masks: one mask per target word.\n"
           "5. Attention Edit Sampler, decode. Attention Heat Maps shows where 'white' attends in the result.")


WORKFLOWS = {"07_mag_edit": mag_edit}
