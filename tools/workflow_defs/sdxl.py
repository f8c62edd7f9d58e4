"""SDXL versions of the foundation workflows (1024 px)."""

from .common import invert, save

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


WORKFLOWS = {"20_sdxl_nulltext_word_swap": sdxl_nulltext_word_swap}
