"""The one module of `masks/` that touches ComfyUI: the `models/sams` folder and devices.

Nothing happens at import: the folder is registered by `register_sam_folder()`, which the SAM node calls when
ComfyUI asks for its inputs. An existing "sams" entry (ComfyUI-Impact-Pack and others register the same name) is
shared, never replaced: our default folder and extensions are added to it.
"""

from __future__ import annotations

import os

import torch

from .sam import SAM_EXTENSIONS, SamError

SAM_FOLDER = "sams"


def register_sam_folder() -> str:
    """Make sure folder_paths knows `models/sams` (idempotent); returns the default folder's path."""
    import folder_paths

    default = os.path.join(folder_paths.models_dir, SAM_FOLDER)
    created = SAM_FOLDER not in folder_paths.folder_names_and_paths
    if created or default not in folder_paths.folder_names_and_paths[SAM_FOLDER][0]:
        folder_paths.add_model_folder_path(SAM_FOLDER, default)  # creates ([path], set()) or appends the path
    extensions = folder_paths.folder_names_and_paths[SAM_FOLDER][1]
    missing = [e for e in SAM_EXTENSIONS if e not in extensions]
    if missing and (created or extensions):  # someone else's empty collection already means "every file"
        if isinstance(extensions, set):
            extensions.update(missing)
        elif isinstance(extensions, list):
            extensions.extend(missing)
    return default


def sam_checkpoints() -> list[str]:
    """File names of the SAM checkpoints ComfyUI can see."""
    import folder_paths

    register_sam_folder()
    return list(folder_paths.get_filename_list(SAM_FOLDER))


def sam_checkpoint_path(name: str) -> str:
    """Full path of checkpoint `name`, or a SamError naming the folders to put it in."""
    import folder_paths

    default = register_sam_folder()
    path = folder_paths.get_full_path(SAM_FOLDER, name) if name else None
    if path is None:
        folders = folder_paths.get_folder_paths(SAM_FOLDER)
        raise SamError(f"SAM checkpoint {name!r} not found. Download sam_vit_b_01ec64.pth (or vit_l / vit_h) from "
                       f"https://github.com/facebookresearch/segment-anything#model-checkpoints and put it in "
                       f"{default} (searched: {', '.join(folders)}), then refresh the browser.")
    return path


def compute_device() -> torch.device:
    import comfy.model_management

    return comfy.model_management.get_torch_device()


def intermediate_device() -> torch.device:
    import comfy.model_management

    return comfy.model_management.intermediate_device()


def check_interrupt() -> None:
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()


def progress_bar(total: int):
    """ComfyUI's progress bar over `total` units (call `.update(1)`)."""
    import comfy.utils

    return comfy.utils.ProgressBar(max(int(total), 1))
