"""Every key this pack writes into ComfyUI's `model_options["transformer_options"]`, defined once.

Keys are prefixed `attnedit_` so they can never collide with core or another pack. Values stored under them are either
immutable (controllers, step hooks: frozen dataclasses whose `__deepcopy__` returns self, because
`ModelPatcher.clone()` deep-copies model_options) or the per-run `RunState`, which only the node that samples puts on
its private clone and clears in `finally`.
"""

RUN = "attnedit_run"  # RunState of the sampling call in progress (set by the node that samples, never by a patch node)
CONTROLLERS = "attnedit_controllers"  # tuple[Controller, ...] appended by patch nodes (AttentionHook, CPAM, ...)
STEP_HOOKS = "attnedit_step_hooks"  # tuple[StepHook, ...] run by the edit sampler around every denoising step
DISPATCH_MARK = "attnedit_dispatch"  # attribute set on our replace functions so we recognise our own patches
CONTEXT_PATCHES = "attnedit_context_patches"  # tuple of context patchers extending the cross-attention context (CPAM)
CONTEXT_EXTRA = "attnedit_context_extra"  # per block call: ((name, tokens), ...) appended after the prompt tokens
BOUND_INVERSIONS = "attnedit_bound_inversions"  # ((node, key, description), ...): patches made for one inversion
DISPATCHED_SITES = "attnedit_dispatched_sites"  # frozenset of attn2 site keys routed through our dispatcher
VELOCITY = "attnedit_velocity"  # DIFFUSION_MODEL wrapper key reading a flow model's raw velocity (hooks.py)
VELOCITY_BOX = "attnedit_velocity_box"  # per velocity read (SD3): dict the MMDiT forward tap puts the raw output in
JOINT = "attnedit_joint"  # set on a Flux clone whose joint attention goes through our override (hooks.py)
SITE = "attnedit_site"  # per block call (Flux): (block, index) of the block whose attention runs (patches_replace dit)
JOINT_LAYOUT = "attnedit_joint_layout"  # per model call (Flux): JointLayout (text tokens, image grid)
