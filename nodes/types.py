"""Custom ComfyUI type names of this pack (frozen forever: saved workflows reference them)."""

INVERSION = "ATTNEDIT_INVERSION"  # inversion.trajectory.InversionTrajectory
ATTN_STORE = "ATTNEDIT_ATTN_STORE"  # attention.store.AttentionStore

CATEGORY = "Attention Edit"
CAT_INVERSION = f"{CATEGORY}/inversion"
CAT_ATTENTION = f"{CATEGORY}/attention"
CAT_SAMPLING = f"{CATEGORY}/sampling"
CAT_MASKS = f"{CATEGORY}/masks"
CAT_TECHNIQUES = f"{CATEGORY}/techniques"
