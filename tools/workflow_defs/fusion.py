"""MaSaFusion workflows: Canny T2I-Adapter + mask shape change (Alg. 1) and EmbCtrl colour change (Alg. 4)."""

from .common import invert, loaders, save

ADAPTER = "t2iadapter_canny_sd14v1.pth"  # TencentARC's SD1.4 Canny T2I-Adapter; the tests swap in a tiny random one
SHAPE_SOURCE = "a photo of a cat sitting on a sofa"
SHAPE_TARGET = "a photo of a dog sitting on a sofa"
COLOUR_SOURCE = "a photo of an orange cat sitting on a blue sofa"
COLOUR_TARGET = "a photo of an orange cat sitting on a red sofa"


def canny_shape_change(g):
    ckpt, img = loaders(g)
    inv = invert(g, ckpt, img, SHAPE_SOURCE, method="direct")
    edges = g.node("Canny", image=img["IMAGE"], low_threshold=0.4, high_threshold=0.8)
    adapter = g.node("ControlNetLoader", control_net_name=ADAPTER)
    prompt = g.node("CLIPTextEncode", text=SHAPE_TARGET, clip=ckpt["CLIP"])
    negative = g.node("CLIPTextEncode", text="", clip=ckpt["CLIP"])
    # Apply ControlNet (Advanced): the current core node on both hosts (plain Apply ControlNet is deprecated); its
    # optional `vae` (newer hosts only) is not needed by T2I-Adapters.
    applied = g.node("ControlNetApplyAdvanced", positive=prompt[0], negative=negative[0], control_net=adapter[0],
                     image=edges[0], strength=1.0, start_percent=0.0, end_percent=1.0)
    canvas = g.node("SolidMask", value=0.0, width=512, height=512)
    box = g.node("SolidMask", value=1.0, width=224, height=320)
    region = g.node("MaskComposite", destination=canvas[0], source=box[0], x=144, y=112, operation="add")
    fused = g.node("AttnEditFusionWithAdapter", model=ckpt["MODEL"], clip=ckpt["CLIP"], inversion=inv["inversion"],
                   target_prompt=SHAPE_TARGET, mask=region[0], seed=0, start_step=0, layers="all",
                   adapter=applied["positive"])
    save(g, ckpt["VAE"], fused["latent"], "attnedit_masafusion")
    intermediate = g.node("VAEDecode", samples=fused["intermediate_latent"], vae=ckpt["VAE"])
    g.node("PreviewImage", images=intermediate[0])
    g.note("MaSaFusion: shape change inside a marked region, guided by a T2I-Adapter (Li, Yi, Li, Alg. 1).\n"
           "1. Invert Image with method direct (fast, exact source branch; null_text also works).\n"
           "2. The adapter hint says which SHAPE to draw: here Canny edges of the photo as a starting point. For a "
           "real shape change replace them with an edited sketch/edge map (draw the dog's outline), e.g. a Load "
           "Image of your drawing. Load ControlNet Model needs the T2I-Adapter file " + ADAPTER + " in "
           "models/controlnet (any SD1.x T2I-Adapter or ControlNet works). Apply ControlNet (Advanced): strength is the "
           "adapter's cond_weight, start/end percent act as cond_tau; only the adapter on its positive output is "
           "used, not that node's prompts.\n"
           "3. mask = edit region A (here a box over the cat built with mask nodes; better: paint it on Load "
           "Image with the mask editor and connect its MASK). Outside A the source image is kept through the "
           "source's self-attention; inside A the edit borrows the self-attention map of an intermediate image "
           "drawn from fresh noise (seed) by the adapter.\n"
           "Knobs: seed changes the intermediate (and so the edit); start_step > 0 lets the first steps run "
           "unfused (counted on a 50-step schedule, scaled to the inversion's steps); layers 'decoder' fuses only "
           "MasaCtrl's layers; adapter_on_target (on, as Alg. 1) also feeds the adapter to the edited image. The "
           "preview shows the intermediate image. "
           "Unplug `adapter` for the adapter-free variant (App. C).")


def embctrl_colour_change(g):
    ckpt, img = loaders(g)
    inv = invert(g, ckpt, img, COLOUR_SOURCE, method="null_text")
    target = g.node("AttnEditEmbCtrl", clip=ckpt["CLIP"], source_prompt=COLOUR_SOURCE, target_prompt=COLOUR_TARGET,
                    alignment="align tokens")
    edit = g.node("AttnEditEditSampler", model=ckpt["MODEL"], inversion=inv["inversion"], target=target["target"])
    save(g, ckpt["VAE"], edit["latent"], "attnedit_embctrl")
    g.note("EmbCtrl: colour change that keeps everything else (MaSaFusion paper, App. B, Alg. 4).\n"
           "CLIP is causal: writing 'red' for 'blue' normally changes the embedding of every later token ('sofa', "
           "end of text, padding), and with them unrelated details. EmbCtrl builds the target prompt from the "
           "source prompt's embeddings and takes only the changed words from the target (Eq. 12); its "
           "changed_tokens output lists them.\n"
           "The edit sampler on the plain MODEL then denoises the inverted noise with it (null-text inversion: "
           "the papers' setting). alignment 'align tokens' also handles words of another token length; "
           "'same token count only' is Eq. 12 literally. EmbCtrl is for shape-keeping edits (colour, material); "
           "for shape changes use MaSaFusion.")


WORKFLOWS = {
    "11_masafusion_canny_shape_change": canny_shape_change,
    "12_embctrl_colour_change": embctrl_colour_change,
}
