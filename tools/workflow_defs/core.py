"""Foundation workflows: DDIM reconstruct, null-text + word swap, refine + local blend, re-weight."""

from .common import invert, loaders, save

SOURCE = "a photo of a cat sitting on a sofa"


def ddim_reconstruct(g):
    ckpt, img = loaders(g)
    inv = invert(g, ckpt, img, SOURCE, method="ddim", cfg=1.0)
    pos = g.node("CLIPTextEncode", text=SOURCE, clip=ckpt["CLIP"])
    neg = g.node("CLIPTextEncode", text="", clip=ckpt["CLIP"])
    sampler = g.node("AttnEditDDIMSampler")
    out = g.node("SamplerCustom", model=ckpt["MODEL"], add_noise=False, noise_seed=0, cfg=1.0, positive=pos[0],
                 negative=neg[0], sampler=sampler[0], sigmas=inv["sigmas"], latent_image=inv["noise_latent"])
    save(g, ckpt["VAE"], out["output"], "attnedit_ddim_reconstruct")
    g.note("DDIM inversion round trip with core nodes.\n"
           "Invert Image (method ddim, cfg 1) finds the noise latent that regenerates the photo; core SamplerCustom "
           "with the DDIM Sampler (Attention Edit), add_noise OFF, the inversion's sigmas and the same prompt at cfg 1 "
           "regenerates it. The Invert node's psnr output reports how close the round trip is (higher is better; "
           "~25-30 dB is typical for SD1.5, the VAE alone limits it).\n"
           "Raising cfg on SamplerCustom shows why plain DDIM inversion is not enough for editing: the picture drifts. "
           "Null-text inversion (next workflows) fixes that.")


def nulltext_word_swap(g):
    ckpt, img = loaders(g)
    inv = invert(g, ckpt, img, SOURCE, method="null_text")
    hook = g.node("AttnEditAttentionHook", model=ckpt["MODEL"], clip=ckpt["CLIP"], source_prompt=SOURCE,
                  target_prompt="a photo of a tiger sitting on a sofa", mode="replace", cross_replace=0.8,
                  self_replace=0.5, local_blend="cat, tiger")
    edit = g.node("AttnEditEditSampler", model=hook["model"], inversion=inv["inversion"])
    decoded = save(g, ckpt["VAE"], edit["latent"], "attnedit_word_swap")
    g.node("AttnEditAttentionPreview", attention=edit["attention"], image=decoded["IMAGE"], branch="target",
           words="tiger, sofa")
    g.note("Null-text inversion + Prompt-to-Prompt word swap (cat -> tiger).\n"
           "1. Invert Image: null_text, 50 steps, cfg 7.5 (the papers' setting). psnr tells the reconstruction quality.\n"
           "2. Prompt-to-Prompt Attention Hook: source prompt = the Invert prompt; target = the same words with one "
           "swapped. cross_replace 0.8 / self_replace 0.5 keep the layout (raise to keep more, lower to change more). "
           "local_blend 'cat, tiger' restricts the change to where those words attend.\n"
           "3. Attention Edit Sampler runs source and target branches together; decode its latent.\n"
           "Re-running after changing only the hook or the target does NOT invert again (ComfyUI caches Invert).")


def refine_local_blend(g):
    ckpt, img = loaders(g)
    inv = invert(g, ckpt, img, SOURCE, method="null_text")
    hook = g.node("AttnEditAttentionHook", model=ckpt["MODEL"], clip=ckpt["CLIP"], source_prompt=SOURCE,
                  target_prompt="a photo of a fluffy cat sitting on a sofa", mode="refine", cross_replace=0.8,
                  self_replace=0.6, local_blend="cat", blend_threshold=0.3, blend_start=0.2)
    edit = g.node("AttnEditEditSampler", model=hook["model"], inversion=inv["inversion"])
    save(g, ckpt["VAE"], edit["latent"], "attnedit_refine")
    g.note("Prompt-to-Prompt refinement: add words to the caption ('fluffy').\n"
           "mode refine aligns the two prompts token by token; new words attend freely, the others copy the source's "
           "attention. local_blend 'cat' keeps everything outside the cat identical to the photo (blend_threshold: "
           "lower = larger region; blend_start: fraction of steps before blending starts).")


def reweight(g):
    ckpt, img = loaders(g)
    prompt = "a photo of a fluffy cat sitting on a sofa"
    inv = invert(g, ckpt, img, prompt, method="null_text")
    hook = g.node("AttnEditAttentionHook", model=ckpt["MODEL"], clip=ckpt["CLIP"], source_prompt=prompt,
                  target_prompt=prompt, mode="reweight", cross_replace=0.8, self_replace=0.4, reweight="fluffy=3.0")
    edit = g.node("AttnEditEditSampler", model=hook["model"], inversion=inv["inversion"])
    save(g, ckpt["VAE"], edit["latent"], "attnedit_reweight")
    g.note("Prompt-to-Prompt re-weighting: same prompt, one word made stronger.\n"
           "reweight 'fluffy=3.0' multiplies that word's cross-attention by 3 in the target branch (values < 1 weaken "
           "it, 0 removes it). Works with replace and refine too.")


WORKFLOWS = {
    "01_ddim_reconstruct": ddim_reconstruct,
    "02_nulltext_word_swap": nulltext_word_swap,
    "03_refine_local_blend": refine_local_blend,
    "04_reweight": reweight,
}
