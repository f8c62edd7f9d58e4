"""InstDiffEdit workflow: edit text only -> instant masks -> inpainting finish with an SD inpainting checkpoint."""

from .common import CHECKPOINT, EXAMPLE_IMAGE

INPAINT_CHECKPOINT = "sd-v1-5-inpainting.ckpt"  # placeholder SD1.5 inpainting name; the runner swaps what you have


def instdiffedit(g):
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    inpaint = g.node("CheckpointLoaderSimple", title="Inpainting checkpoint", ckpt_name=INPAINT_CHECKPOINT)
    img = g.node("LoadImage", image=EXAMPLE_IMAGE)
    edit = g.node("AttnEditInstantEdit", image=img["IMAGE"], model=ckpt["MODEL"], clip=ckpt["CLIP"], vae=ckpt["VAE"],
                  inpaint_model=inpaint["MODEL"], edit_text="a photo of a dog sitting on a sofa", strength=0.5,
                  steps=50, cfg=7.5, seeds=3, seed=0, phi=0.2, gamma1=0.9, gamma2=0.6)
    g.node("SaveImage", images=edit["image"], filename_prefix="attnedit_instdiffedit")
    mask = g.node("MaskToImage", mask=edit["mask"])
    g.node("PreviewImage", images=mask[0])
    g.note("InstDiffEdit (Zou et al., AAAI 2024): edit a photo from the edit text alone.\n"
           "No source prompt, no inversion, no painted mask: the photo is noised to strength 0.5 of a 50-step "
           "schedule and denoised with 3 seeds in parallel; at every step the cross-attention of the edit text "
           "(averaged over the seeds) gives an instant mask, and only the masked region follows the text. The last "
           "mask then drives an inpainting pass with the SD inpainting checkpoint (second loader); disconnect it to "
           "inpaint with the main model, or set finish = 'blend only' to skip the pass.\n"
           "Knobs (paper defaults): strength r (higher = bigger masks, less of the photo kept), phi 0.2 (mask "
           "threshold: higher = tighter), gamma1 0.9 / gamma2 0.6 (which words count as the object / background), "
           "seeds 3, cfg 7.5. The mask output shows what was edited; paste_back (on) copies the untouched pixels "
           "back through a soft edge of `feather` px (16) so the 8-px blocks of the mask never show. finish = "
           "'inpaint full frame' lets the inpainting checkpoint repaint the whole picture, as the paper's code.")


WORKFLOWS = {"13_instdiffedit": instdiffedit}
