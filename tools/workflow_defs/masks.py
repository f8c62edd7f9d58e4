"""Mask workflows: attention -> mask -> core inpainting, and a SAM mask -> core inpainting."""

from .common import invert, loaders, save

SOURCE = "a photo of a cat sitting on a sofa"
TARGET = "a photo of a dog sitting on a sofa"
SAM_CHECKPOINT = "sam_vit_b_01ec64.pth"  # the official ViT-B file name; put it in models/sams


def _inpaint(g, ckpt, img, mask, prefix):
    """Core inpainting: VAE Encode (for Inpainting) + KSampler with the edit text, decoded and saved."""
    pos = g.node("CLIPTextEncode", text=TARGET, clip=ckpt["CLIP"])
    neg = g.node("CLIPTextEncode", text="", clip=ckpt["CLIP"])
    latent = g.node("VAEEncodeForInpaint", pixels=img["IMAGE"], vae=ckpt["VAE"], mask=mask, grow_mask_by=6)
    out = g.node("KSampler", model=ckpt["MODEL"], seed=0, steps=30, cfg=7.5, sampler_name="euler",
                 scheduler="normal", positive=pos[0], negative=neg[0], latent_image=latent[0], denoise=1.0)
    return save(g, ckpt["VAE"], out[0], prefix)


def attention_mask_inpaint(g):
    ckpt, img = loaders(g)
    inv = invert(g, ckpt, img, SOURCE, method="ddim", cfg=1.0)
    mask = g.node("AttnEditMaskFromAttention", attention=inv["attention"], image=img["IMAGE"], mode="instant")
    g.node("PreviewImage", images=mask["preview"])
    _inpaint(g, ckpt, img, mask["mask"], "attnedit_attention_mask_inpaint")
    g.note("Mask from the model's own attention, then core inpainting.\n"
           "1. Invert Image (ddim, cfg 1 is enough here) captures the cross-attention of the caption while it "
           "inverts the photo.\n"
           "2. Mask from Attention, mode instant (InstDiffEdit): finds the object of the caption by itself and "
           "outputs a binary mask at the image size (preview: heat map and mask). mode local blend + words 'cat' "
           "uses Prompt-to-Prompt's mask of the named words instead (threshold: lower = larger; dilation: grow by "
           "attention cells). phi / gamma1 / gamma2 are the InstDiffEdit thresholds (0.2 / 0.9 / 0.6).\n"
           "3. VAE Encode (for Inpainting) + KSampler repaint the masked region with the edit text. An SD inpainting "
           "checkpoint gives the best blend; InpaintModelConditioning works the same way with the mask.")


def sam_mask_inpaint(g):
    ckpt, img = loaders(g)
    sam = g.node("AttnEditSAMMask", image=img["IMAGE"], sam_model=SAM_CHECKPOINT, points="0.45,0.55",
                 coordinates="fraction", multimask=True)
    preview = g.node("MaskToImage", mask=sam["mask"])
    g.node("PreviewImage", images=preview[0])
    _inpaint(g, ckpt, img, sam["mask"], "attnedit_sam_mask_inpaint")
    g.note("Segment Anything mask, then core inpainting.\n"
           f"Put {SAM_CHECKPOINT} (or sam_vit_l / sam_vit_h) from github.com/facebookresearch/segment-anything in "
           "ComfyUI/models/sams and `pip install segment-anything`.\n"
           "SAM Mask: points ON the object (here one point at 45% of the width, 55% of the height; coordinates "
           "'pixels' takes pixel positions), negative_points on what must stay out, and/or a box x1,y1,x2,y2; a "
           "rough mask_hint (e.g. from Mask from Attention) also helps. multimask keeps SAM's best of 3 proposals.\n"
           "Any MASK works with the pack's nodes and core inpainting, at any size.")


WORKFLOWS = {
    "05_attention_mask_inpaint": attention_mask_inpaint,
    "06_sam_mask_inpaint": sam_mask_inpaint,
}
