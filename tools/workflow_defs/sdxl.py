"""SDXL versions of the foundation and technique workflows (1024 px)."""

from .common import invert, save
from .cpam import CAT_BOX, CHAIN_NOTE
from .mag import mag_chain

SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"  # placeholder SDXL name; the runner swaps in what you have
SOURCE = "a photo of a cat sitting on a sofa"


def sdxl_nulltext_word_swap(g):
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=SDXL_CHECKPOINT)
    img = g.node("LoadImage", image="attention_edit_example.jpg")
    scaled = g.node("ImageScale", image=img["IMAGE"], upscale_method="lanczos", width=1024, height=1024,
                    crop="center")
    inv = invert(g, ckpt, scaled, SOURCE, method="null_text", cfg=7.0)
    hook = g.node("AttnEditAttentionHook", model=ckpt["MODEL"], clip=ckpt["CLIP"], source_prompt=SOURCE,
                  target_prompt="a photo of a tiger sitting on a sofa", mode="replace", cross_replace=0.8,
                  self_replace=0.5, local_blend="cat, tiger")
    edit = g.node("AttnEditEditSampler", model=hook["model"], inversion=inv["inversion"])
    save(g, ckpt["VAE"], edit["latent"], "attnedit_sdxl_word_swap")
    g.note("SDXL: null-text inversion + Prompt-to-Prompt word swap at 1024 px.\n"
           "Same chain as the SD1.5 workflow: the pack finds SDXL's attention layers from the model (its 'semantic' "
           "maps are 32x32 at 1024 px), encodes both text encoders and optimises the null-text embedding of both "
           "(the pooled/size conditioning stays that of the empty prompt). cfg 7.0 suits SDXL; null-text optimises "
           "for the cfg you invert with. Expect roughly 2-3x the SD1.5 time.")


def _sdxl_loaders(g):
    """SDXL checkpoint + the example picture scaled to SDXL's native 1024x1024."""
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=SDXL_CHECKPOINT)
    img = g.node("LoadImage", image="attention_edit_example.jpg")
    scaled = g.node("ImageScale", image=img["IMAGE"], upscale_method="lanczos", width=1024, height=1024,
                    crop="center")
    return ckpt, scaled


def _box_mask(g, x, y, width, height, title="mask (replace with yours)"):
    """A white box on a black 1024x1024 canvas (core SolidMask + MaskComposite)."""
    canvas = g.node("SolidMask", value=0.0, width=1024, height=1024)
    box = g.node("SolidMask", value=1.0, width=width, height=height)
    return g.node("MaskComposite", title=title, destination=canvas["MASK"], source=box["MASK"], x=x, y=y,
                  operation="add")


def sdxl_mag_edit(g):
    ckpt, img = _sdxl_loaders(g)
    mask = _box_mask(g, x=360, y=290, width=340, height=580)  # the cat of the example picture at 1024 px
    g.node("PreviewImage", images=g.node("MaskToImage", mask=mask["MASK"])["IMAGE"])
    mag_chain(g, ckpt, img, mask, "attnedit_sdxl_mag_edit", cfg=7.0, max_iterations=10, guidance_steps=15)
    g.note("SDXL MAG-Edit: put the edit where the mask is (guided inside it, the source kept outside it), at 1024 px.\n"
           "Same chain as the SD1.5 MAG-Edit workflow: Invert Image (null_text, 50 steps) -> Prompt-to-Prompt "
           "Attention Hook (mode refine, cross 0.8, self 0.5; the target prompt adds the new word) -> MAG-Edit "
           "Guidance -> Attention Edit Sampler.\n"
           "- Mask: a box over the cat of the example picture, drawn at 1024x1024 (Solid Mask + Mask Composite); "
           "paint your own (Load Image -> Open in MaskEditor) or use SAM. The guidance reads SDXL's 32x32 "
           "cross-attention maps (one cell = 32x32 px at 1024 px), so the mask must cover at least one such cell.\n"
           "- target_words: the NEW word(s) of the target prompt ('white'; several: 'white=0.7, fluffy=0.3'). "
           "constraint token_ratio for colour/texture, spatial_ratio for stronger object/shape edits.\n"
           "- SDXL cost: each guidance iteration is a forward+backward pass through SDXL's UNet up to its last "
           "32x32 layer (most of the model), several times the SD1.5 cost. This workflow uses max_iterations 10 x "
           "guidance_steps 15 instead of the paper's 15 x 25 (SD1.5); raise them for stronger edits, lower them "
           "for speed (the step knobs count steps of a 50-step run and scale to the inversion's). scale 2.5 = step "
           "size; blend_steps 15 copies everything outside the mask from the source in the last 15 of 50 steps.\n"
           "- cfg 7.0 suits SDXL; null-text inversion optimises for the cfg you invert with (both text encoders' "
           "null embeddings are optimised; the pooled and size conditioning stay the prompt's).")


def sdxl_cpam_object_removal(g):
    ckpt, img = _sdxl_loaders(g)
    inv = invert(g, ckpt, img, SOURCE, method="null_text", cfg=7.0)
    mask = _box_mask(g, x=2 * CAT_BOX["x"], y=2 * CAT_BOX["y"], width=2 * CAT_BOX["width"],
                     height=2 * CAT_BOX["height"], title="object mask (replace with yours)")
    cpam = g.node("AttnEditCPAMSelfAttn", model=ckpt["MODEL"], inversion=inv["inversion"], clip=ckpt["CLIP"],
                  source_mask=mask["MASK"], target_prompt="", strategy="remove object")
    edit = g.node("AttnEditEditSampler", model=cpam["model"], inversion=inv["inversion"],
                  source_branch="pin to inversion")
    save(g, ckpt["VAE"], edit["latent"], "attnedit_sdxl_cpam_removal")
    g.note("SDXL CPAM object removal (Vo et al., App. A.1) at 1024 px: the cat disappears and the sofa/wall behind "
           "it is filled in.\n"
           "strategy 'remove object': in every self-attention layer of SDXL (its 64x64 and 32x32 blocks, all "
           "transformer depths) every pixel attends only to the background keys of the inversion; cross-attention "
           "hears only the null text, so target_prompt is ignored (leave it empty).\n"
           "- Mask: a box around the cat drawn at 1024x1024. Replace it with a painted or SAM mask (white = the "
           "object); grow it a little (core GrowMask) if a ghost of the object or its shadow stays. SDXL's "
           "coarsest attention grid is 32x32 at 1024 px, so very thin masks vanish there: keep a margin of 32 px.\n"
           "- For the other strategies on SDXL: start_layer -1 picks the paper's position for the model (SDXL's 11 "
           "transformer blocks 0-10: 6 = decoder from its second 32x32 block; SD1.5: 8).\n" + CHAIN_NOTE
           + "\n(SDXL: cfg 7.0; the null-text embeddings of both text encoders are optimised.)")


WORKFLOWS = {"20_sdxl_nulltext_word_swap": sdxl_nulltext_word_swap,
             "21_sdxl_mag_edit": sdxl_mag_edit,
             "22_sdxl_cpam_object_removal": sdxl_cpam_object_removal}
