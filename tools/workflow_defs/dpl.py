"""Dynamic Prompt Learning workflow: multi-object photo -> DPL inversion -> Prompt-to-Prompt word swap of one object."""

from .common import CHECKPOINT, EXAMPLE_IMAGE, save

SOURCE = "a photo of a cat sitting on a sofa"
TARGET = "a photo of a tiger sitting on a sofa"


def dpl_word_swap(g):
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    img = g.node("LoadImage", image=EXAMPLE_IMAGE)
    dpl = g.node("AttnEditDynamicPromptLearn", model=ckpt["MODEL"], clip=ckpt["CLIP"], image=img["IMAGE"],
                 vae=ckpt["VAE"], source_prompt=SOURCE, nouns="cat, sofa", steps=50, cfg=7.5, token_iterations=21,
                 null_text_iterations=10)
    hook = g.node("AttnEditAttentionHook", model=ckpt["MODEL"], clip=ckpt["CLIP"], source_prompt=SOURCE,
                  target_prompt=TARGET, mode="replace", cross_replace=0.8, self_replace=0.5, local_blend="cat, tiger")
    edit = g.node("AttnEditEditSampler", model=hook["model"], inversion=dpl["inversion"])
    save(g, ckpt["VAE"], edit["latent"], "attnedit_dpl_word_swap")
    g.node("AttnEditAttentionPreview", attention=dpl["attention"], image=img["IMAGE"], branch="source",
           words="cat, sofa")
    background = g.node("MaskToImage", mask=dpl["background"])
    g.node("PreviewImage", images=background["IMAGE"])
    g.note("Dynamic Prompt Learning (Wang et al., NeurIPS 2023) + Prompt-to-Prompt word swap (cat -> tiger).\n"
           "For photos with several objects where a plain null-text edit of one object leaks into the others or "
           "into the background.\n"
           "1. Dynamic Prompt Learning: the caption must name the objects; `nouns` lists the words whose tokens are "
           "learned at every step (here cat and sofa). It inverts like null-text inversion and returns the inversion, "
           "the learned source attention (heat maps: each noun should sit on its own object) and the background mask "
           "it used (estimated from self-attention; connect your own MASK to `background` to override it). "
           "token_iterations (21) / null_text_iterations (10) bound the work per step; lower them for speed.\n"
           "2. Prompt-to-Prompt Attention Hook exactly as with Invert Image: same source prompt, one word swapped.\n"
           "3. Attention Edit Sampler: the source branch uses the learned tokens step by step, and the target "
           "prompt gets the learned token of every listed noun it keeps (here sofa; learned_tokens_in_target).\n"
           "Lambdas (advanced inputs): attention 1.0, disjoint 0.05, background 0.05 are the official code's; its "
           "README notes the best values can vary per image.")


WORKFLOWS = {"14_dpl_word_swap": dpl_word_swap}
