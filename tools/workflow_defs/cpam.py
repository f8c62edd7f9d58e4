"""CPAM workflows: object removal, pose/view change with the object kept, background change."""

from .common import invert, loaders, save

CAT_BOX = {"x": 176, "y": 136, "width": 168, "height": 280}  # the cat in the 512x512 example picture

INVERSION_METHOD = "ddim_null_prompt"  # Sec. 4.1: DDIM inversion guided by the null text, no source prompt
MASK_NOTE = ("The mask here is a box drawn with core SolidMask + MaskComposite around the cat of the example "
             "picture. For your own image, replace it with a painted mask (right-click Load Image -> Open in "
             "MaskEditor, then use its MASK output) or a segmentation mask (SAM): white = the object. Any size is "
             "fine: it is stretched to the image and read on the 8x8-pixel latent grid (a cell is inside when at "
             "least half covered).")
CHAIN_NOTE = ("Chain: Invert Image (method ddim_null_prompt, 50 steps, cfg 7.5: the paper's setting, DDIM inversion "
              "guided by the null text with no source prompt, so source_prompt stays empty) -> CPAM Self-Attention "
              "(mask, target prompt, strategy) -> Attention Edit Sampler (source_branch 'pin to inversion', so "
              "the keys/values CPAM keeps come from the inversion's intermediate latents z_i themselves; the sampler "
              "pins it under CPAM anyway) -> VAE Decode. Changing only the CPAM node never re-runs the inversion. "
              "Step values (start_step, refine_step) are counted on the paper's 50 steps; at other step counts "
              "they keep their fraction of the run.")


def _cat_mask(g):
    canvas = g.node("SolidMask", value=0.0, width=512, height=512)
    box = g.node("SolidMask", value=1.0, width=CAT_BOX["width"], height=CAT_BOX["height"])
    return g.node("MaskComposite", title="object mask (replace with yours)", destination=canvas[0], source=box[0],
                  x=CAT_BOX["x"], y=CAT_BOX["y"], operation="add")


def _cpam_chain(g, strategy, target, prefix, **knobs):
    ckpt, img = loaders(g)
    inv = invert(g, ckpt, img, "", method=INVERSION_METHOD)
    mask = _cat_mask(g)
    cpam = g.node("AttnEditCPAMSelfAttn", model=ckpt["MODEL"], inversion=inv["inversion"], clip=ckpt["CLIP"],
                  source_mask=mask[0], target_prompt=target, strategy=strategy, **knobs)
    edit = g.node("AttnEditEditSampler", model=cpam["model"], inversion=inv["inversion"],
                  source_branch="pin to inversion")
    save(g, ckpt["VAE"], edit["latent"], prefix)


def object_removal(g):
    _cpam_chain(g, "remove object", "", "attnedit_cpam_removal")
    g.note("CPAM object removal (Vo et al., App. A.1): the cat disappears and the sofa/wall behind it is filled in.\n"
           "strategy 'remove object': in every self-attention layer every pixel attends only to the background "
           "keys of the inversion (outside the mask), so the masked region is rebuilt from the surroundings; "
           "cross-attention sees only the null text everywhere, so target_prompt is ignored (leave it empty).\n"
           "If a ghost of the object stays, grow the mask a little (core GrowMask) so it covers the object's "
           "outline and shadow.\n" + CHAIN_NOTE + "\n" + MASK_NOTE)


def pose_change(g):
    _cpam_chain(g, "edit object (keep identity)", "a photo of a cat standing on a sofa", "attnedit_cpam_pose",
                object_words="cat", start_step=3, start_layer=8, refine_step=5)
    g.note("CPAM pose/view change with the object retained (Eq. 1-4): the cat stands up but keeps its fur, colour "
           "and face; the sofa and wall stay as they are.\n"
           "- start_step / start_layer (S = 3 of 50 steps, L = 8, the paper's values): from that step and that "
           "transformer block (0-15 in forward order for SD1.5; 8 = decoder from the second 16x16 block) the object's "
           "self-attention reads the original object's keys/values. Lower = closer to the original pose and look; "
           "higher = more freedom for the new pose but less identity.\n"
           "- object_words 'cat' + refine_step 5: after 5 of 50 steps (the same fraction at other step counts) "
           "the target mask follows where 'cat' is attended in the edit (the object may change shape); "
           "refine_threshold sets how tight that mask is. Without object_words it is the source mask grown by "
           "mask_expand (at least one latent cell per side).\n"
           "- localized_extraction (on): outside the mask cross-attention sees only the null text, so the prompt "
           "cannot leak into the background. free_layers 0.1 + seed: the nearest whole count to 10% of the "
           "self-attention layers (2 of 16 on SD1.5) use normal self-attention at each step so object and background "
           "blend naturally.\n" + CHAIN_NOTE + "\n" + MASK_NOTE)


def background_change(g):
    _cpam_chain(g, "change background", "a photo of a cat sitting on a sofa on a sunny beach",
                "attnedit_cpam_background")
    g.note("CPAM background change: the cat (and only the cat) is kept, everything else follows the target "
           "prompt.\n"
           "strategy 'change background': the connected mask is the object to KEEP; CPAM edits its complement. "
           "The kept object reads its own keys/values from the inversion (Eq. 1 with the roles swapped) and hears "
           "only the null text; the new background hears the target prompt and is generated freely.\n"
           "Describe the whole new scene in target_prompt, including the kept object.\n" + CHAIN_NOTE + "\n"
           + MASK_NOTE)


WORKFLOWS = {
    "08_cpam_object_removal": object_removal,
    "09_cpam_pose_change": pose_change,
    "10_cpam_background_change": background_change,
}
