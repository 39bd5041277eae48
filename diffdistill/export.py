"""``diffdistill export``: a trained student as a diffusers folder.

The folder is the teacher format (``UNet2DModel`` / ``UNet2DConditionModel`` weights and config,
``scheduler_config.json``, ``diffdistill.json``) with the student's sampling levels recorded in
``diffdistill.json`` under ``"student"``, so ``UNet2DModel.from_pretrained`` loads it and
``diffdistill sample --checkpoint`` samples it as a denoiser.
"""

from __future__ import annotations

from pathlib import Path

from .errors import UserError


def export_generator(checkpoint: str, out: str) -> Path:
    """Export the student of ``checkpoint`` (run or checkpoint folder) to the new folder ``out``."""
    from diffusers import DDPMScheduler

    from .generator import load_generator
    from .teachers import VPUNetDenoiser, save_teacher_folder

    dest = Path(out)
    if dest.exists() and any(dest.iterdir()):
        raise UserError(f"{dest} exists and is not empty; choose a new folder")
    gen = load_generator(checkpoint, device="cpu")
    net = gen.denoiser
    if not isinstance(net, VPUNetDenoiser):
        raise UserError(f"only diffusers-UNet students can be exported; this one is a {type(net).__name__}")
    unet = net.unet
    if hasattr(unet, "peft_config") or any("lora_" in n for n, _ in unet.named_parameters()):
        raise UserError("LoRA students: merge the adapter first (export of unmerged LoRA is not supported yet)")
    meta = {"num_classes": net.num_classes, "sigma_data": net.sigma_data}
    if not gen.is_teacher:
        meta["student"] = {"levels": gen.model.levels, "renoise": gen.model.renoise}
    save_teacher_folder(unet, DDPMScheduler.from_config(net.scheduler_config), dest, meta)
    return dest
