"""``diffdistill export``: a trained student as a folder that diffusers alone loads and samples.

What is written, by student kind (the student comes from its artefact, :mod:`diffdistill.artefact`):

- text-to-image (SD 1.5 / SDXL UNets): a whole pipeline folder (``model_index.json``, ``unet/``, ``vae/``,
  text encoders, tokenizers, ``scheduler/``), so ``DiffusionPipeline.from_pretrained(dir)(prompt,
  num_inference_steps=K, guidance_scale=0)`` gives the student's samples;
- pixel UNets: ``unet/`` + ``scheduler/`` (+ ``vae/`` for latent class-conditional models) and, where
  diffusers' ``DDPMPipeline`` samples it correctly or fails loudly, a ``model_index.json``;
- LoRA students: ``pytorch_lora_weights.safetensors`` that ``pipe.load_lora_weights(dir)`` accepts on the
  teacher pipeline (text UNets), plus ``scheduler/`` and the artefact itself; ``--merge`` writes full
  weights instead (the only way for pixel ``UNet2DModel``, which has no diffusers LoRA loader);
- multi-student (MSD) artefacts: ``student_k/unet`` + ``student_k/scheduler`` per member, ``router.json`` and
  the artefact (``student/``). Routed by class label: ``router.json`` maps labels to members (+ ``vae/`` for
  latent teachers). Routed by prompt (SD 1.5 / SDXL teachers, ``msd.partition: pca``): a whole pipeline
  folder for the shared VAE / text encoders / tokenizers (its ``unet/`` is member 0's) and ``router.json``
  = the PCA tree over pooled prompt embeddings; the card encodes prompts with ``pipe.encode_prompt``, routes
  each one and samples it with its own member (pixel text teachers, without a VAE, have no pipeline class);
- every export: ``diffdistill.json`` (levels, re-noising, wrapper: ``diffdistill sample --checkpoint DIR``
  samples it in its own steps) and a model card ``README.md`` with the code that samples it.

The scheduler is chosen so that its *plain* ``set_timesteps(K)`` gives the student's levels, and its
``step`` does what the student does between them:

- one step, or deterministic re-noising along the student's own prediction (``renoise: ddim``, TSCD/PCM):
  ``DDIMScheduler`` with trailing spacing and ``set_alpha_to_one`` (``x' = x0 + s'(x - x0)/s`` in sigma
  space, and the last step returns ``x0``), when the levels are teacher timesteps;
- fresh noise between steps (DMD2, iCT): ``LCMScheduler`` with ``original_inference_steps = K`` (its
  ``set_timesteps(K)`` is then DDIM's trailing grid) and a huge ``timestep_scaling``, which makes LCM's
  boundary scalings ``c_skip = 0``, ``c_out = 1`` at every timestep >= 1, i.e. ``x' = sqrt(abar') x0 +
  sqrt(1 - abar') n``;
- levels that are not teacher timesteps (iCT's sigma 80, BOOT's sigma 1, TSCD on a geometric grid): one
  step, or deterministic steps on a Karras or geometric grid, with ``EulerDiscreteScheduler(
  use_karras_sigmas=True | use_exponential_sigmas=True, sigma_max, sigma_min)``, which evaluates the UNet
  at the fractional timestep of each sigma exactly as the VP adapter does (Euler's step
  ``x' = x + (s' - s)(x - x0)/s`` is the DDIM jump in sigma space).

After building it, the scheduler's own levels are compared with the student's; a mismatch is one clear
line. Consistency-parameterised students (iCT/CD/TSCD with ``consistency_param``) output
``f = c_skip x + c_out' D`` rather than ``D``: no diffusers scheduler applies those scalings, so they export
only where ``f`` equals ``D`` to within 1e-3 at every level (one step from the top level: measured
differences ~1e-5); otherwise one line says why.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

from .errors import UserError
from .export_parts import CARD, _card, _known_fid, _write_index, _write_text_pipeline, student_scheduler
from .paths import atomic_folder

MAX_CONSISTENCY_GAP = 1e-3  # |f - D| bound (images in [-1, 1]) below which a consistency student exports


# --------------------------------------------------------------------------------------------------
# Schedulers (student_scheduler is in export_parts)
def _consistency_gap(wrapper: dict, levels: list[float], inner_sigma_data: float) -> float:
    """Bound on ``|f - D|`` over the levels for ``f = c_skip x + c_out'(D - c_skip_edm x)`` with
    ``|x| <= 5 s`` and ``|D| <= 1`` (see :func:`diffdistill.methods.consistency.consistency_from_denoised`)."""
    gap = 0.0
    sd, s_min = wrapper["sigma_data"], wrapper["sigma_min"]
    for s in levels:
        c_skip = 1 / (((s - s_min) / sd) ** 2 + 1)
        c_out = (s - s_min) / s
        c_skip_edm = inner_sigma_data**2 / (s**2 + inner_sigma_data**2)
        gap = max(gap, abs(c_skip - c_out * c_skip_edm) * 5 * s + abs(1 - c_out))
    return gap


# --------------------------------------------------------------------------------------------------
# The model card's code


def _pixel_code(sched_name: str, k: int, shape: tuple, num_classes: Optional[int], latent: bool) -> str:
    c, h, w = shape
    labels = ""
    call = "unet(scheduler.scale_model_input(x, t), t).sample"
    if num_classes:
        labels = (f"labels = torch.arange(16) % {num_classes}  # classes 0..{num_classes - 1}; "
                  f"label {num_classes} is the null (unconditional) class\n")
        call = "unet(scheduler.scale_model_input(x, t), t, class_labels=labels).sample"
    decode = "images = (x.clamp(-1, 1) + 1) / 2  # [16, C, H, W] in [0, 1]"
    vae = ""
    if latent:
        vae = 'vae = AutoencoderKL.from_pretrained(DIR, subfolder="vae")\n'
        decode = ("images = (vae.decode(x / vae.config.scaling_factor).sample.clamp(-1, 1) + 1) / 2")
    return f"""import torch
from diffusers import {"AutoencoderKL, " if latent else ""}UNet2DModel, {sched_name}

DIR = "path/to/this/folder"
unet = UNet2DModel.from_pretrained(DIR, subfolder="unet")
{vae}scheduler = {sched_name}.from_pretrained(DIR, subfolder="scheduler")
scheduler.set_timesteps({k})  # the student's own {k} step(s)
generator = torch.Generator().manual_seed(0)
x = torch.randn((16, {c}, {h}, {w}), generator=generator) * scheduler.init_noise_sigma
{labels}with torch.no_grad():
    for t in scheduler.timesteps:
        out = {call}
        x = scheduler.step(out, t, x, generator=generator).prev_sample
    {decode}
"""


def _text_code(k: int, lora: bool, teacher: str, sched_name: str) -> str:
    if lora:
        return f"""import torch
from diffusers import DiffusionPipeline, {sched_name}

pipe = DiffusionPipeline.from_pretrained("{teacher}")  # the teacher pipeline
pipe.load_lora_weights("path/to/this/folder")
pipe.scheduler = {sched_name}.from_pretrained("path/to/this/folder", subfolder="scheduler")
image = pipe("a photo of a cat", num_inference_steps={k}, guidance_scale=0).images[0]
"""
    return f"""import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("path/to/this/folder")
image = pipe("a photo of a cat", num_inference_steps={k}, guidance_scale=0).images[0]  # guidance is distilled in
"""


# --------------------------------------------------------------------------------------------------
# Export
def export_generator(checkpoint: str, out: str, merge: bool = False, steps: Optional[int] = None) -> Path:
    """Export the student of ``checkpoint`` (a run, checkpoint or artefact folder) to the new folder ``out``.

    ``steps``: export the student sampled in that many steps (default: its own; a run that kept one student
    per stage, TSCD, exports the stage student trained for that many segments); ``merge``: LoRA students
    as full weights. Nothing is written unless the whole export succeeds (temporary folder, then rename).
    """
    from .artefact import _wrapper_of, load_artefact, select_artefact
    from .paths import resolve_path
    from .teachers.vp import VPUNetDenoiser

    dest = Path(out)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UserError(f"{dest} exists and is not empty; choose a new folder")
    if steps is not None and steps < 1:
        raise UserError(f"--steps must be >= 1, got {steps}")
    source = Path(resolve_path(str(checkpoint)))
    if not source.exists():
        raise UserError(f"--checkpoint {checkpoint} does not exist")
    folder, note = select_artefact(source, steps)  # --steps K of a TSCD run: the stage student trained for K
    if note:
        print(note)
    if folder is None:
        raise UserError(f"{checkpoint} holds no student artefact (expected a run folder, a checkpoint folder with "
                        "student/student.json, or an artefact folder)")
    art = load_artefact(folder, "cpu")
    spec = art.spec
    if spec.get("router"):
        from .export_routed import export_routed

        return export_routed(art, folder, dest, str(checkpoint), source, merge, steps)
    if spec["kind"] != "student":
        return _export_denoiser(art, dest, str(checkpoint))
    student = art.model
    wrapper, bare = _wrapper_of(student)
    if not isinstance(bare, VPUNetDenoiser):
        raise UserError(f"only diffusers-UNet students can be exported; this one is a {type(bare).__name__}")
    levels = student.levels_for(steps) if steps is not None else list(student.levels)
    k = len(levels)
    member = spec["members"][0]
    w = member.get("wrapper") or {"type": "plain"}
    notes = []
    tolerance = "1e-4 (the same maths; float32 rounding only)"
    if w["type"] == "consistency":
        gap = _consistency_gap(w, levels, bare.sigma_data)
        if gap > MAX_CONSISTENCY_GAP:
            raise UserError(f"a {k}-step consistency-parameterised student cannot be exported: at its levels "
                            f"{[round(s, 4) for s in levels]} the boundary scalings make f differ from the network's "
                            f"x0 by up to {gap:.2g} and no diffusers scheduler applies them; export it with --steps 1 "
                            "or train with consistency_param: false")
        tolerance = f"{max(gap, 1e-4):.1g} (consistency scalings at these levels are the identity to {gap:.1g})"
        notes.append("consistency-parameterised: the scheduler applies the network's x0 directly, which equals the "
                     f"consistency function at these levels to within {gap:.1g}")
    renoise = student.renoise if w["type"] != "boot" else "fresh"
    sched = student_scheduler(bare.scheduler_config, levels, renoise)
    sched_name = type(sched).__name__
    lora = bool(member.get("lora"))
    text = bool(getattr(bare, "is_text", False))
    latent = art.components is not None and art.components.vae is not None
    if lora and not text and not merge:
        raise UserError("diffusers has no LoRA loader for a pixel UNet2DModel: export this LoRA student with --merge "
                        "(full weights)")
    unet = bare.unet
    if lora and merge:
        from .students import merge_lora

        unet = merge_lora(bare).unet
    timesteps = [round(float(t), 3) for t in sched.timesteps]
    shape = bare.sample_shape if not latent else art.components.image_shape
    facts = {"method": spec.get("method", "?"), "teacher": spec.get("teacher"), "source": str(checkpoint),
             "step": spec.get("step"), "steps": k, "levels": levels, "timesteps": timesteps,
             "scheduler": sched_name, "tolerance": tolerance, "notes": notes,
             "conditioning": "text prompts" if text else (f"class labels 0..{bare.num_classes - 1} (null label "
                                                         f"{bare.num_classes})" if bare.num_classes else "none")}
    fid = _known_fid(source, facts["method"], k)
    if fid is not None:
        facts.update(fid=fid, fid_source="diffdistill quickstart report.json")
    meta = {"num_classes": bare.num_classes, "sigma_data": bare.sigma_data, "exported_by": "diffdistill export",
            "method": facts["method"], "teacher": facts["teacher"],
            "student": {"levels": levels, "renoise": renoise, "wrapper": {"type": "plain"}, "steps": k,
                        "scheduler": sched_name, "lora": lora and not merge}}

    with atomic_folder(dest) as tmp:
        if text and lora and not merge:
            _write_lora(tmp, bare, art, sched)
            code = _text_code(k, True, facts["teacher"], sched_name)
            shutil.copytree(folder, tmp / "student")  # the artefact: diffdistill samples the export from it
        elif text:
            _write_text_pipeline(tmp, unet, art, sched)
            code = _text_code(k, False, facts["teacher"], sched_name)
        else:
            unet.save_pretrained(str(tmp / "unet"), safe_serialization=True)
            sched.save_pretrained(str(tmp / "scheduler"))
            if latent:
                art.components.vae.save_pretrained(str(tmp / "vae"), safe_serialization=True)
            elif bare.num_classes or sched_name != "EulerDiscreteScheduler":
                # DDPMPipeline runs LCM/DDIM exports as they are; for class-conditional UNets it loads the
                # parts and refuses to sample without labels (use the loop in the card)
                _write_index(tmp, {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
                                   "scheduler": ["diffusers", sched_name]})
            code = _pixel_code(sched_name, k, tuple(shape), bare.num_classes, latent)
            if bare.num_classes:
                notes.append("class-conditional: DiffusionPipeline.from_pretrained loads unet and scheduler, "
                             "but DDPMPipeline cannot pass class labels; sample with the loop above")
        (tmp / "diffdistill.json").write_text(json.dumps(meta, indent=2))
        (tmp / CARD).write_text(_card(facts, code))
    return dest


def _export_denoiser(art: Any, dest: Path, source: str) -> Path:
    """A teacher run's network (sampled with an ODE solver): ``unet/`` + its DDPM ``scheduler/`` as a
    ``DDPMPipeline`` folder, plus ``diffdistill.json`` and a card (40-step DDIM with trailing spacing)."""

    from .teachers.vp import VPUNetDenoiser, ddpm_from_config

    net = art.model
    if not isinstance(net, VPUNetDenoiser):
        raise UserError(f"only diffusers-UNet networks can be exported; this one is a {type(net).__name__}")
    with atomic_folder(dest) as tmp:
        net.unet.save_pretrained(str(tmp / "unet"), safe_serialization=True)
        ddpm_from_config(net.scheduler_config).save_pretrained(str(tmp / "scheduler"))
        _write_index(tmp, {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
                           "scheduler": ["diffusers", "DDPMScheduler"]})
        (tmp / "diffdistill.json").write_text(json.dumps({"num_classes": net.num_classes, "sigma_data": net.sigma_data,
                                                          "exported_by": "diffdistill export"}, indent=2))
        code = _pixel_code("DDIMScheduler", 40, tuple(net.sample_shape), net.num_classes, False).replace(
            'DDIMScheduler.from_pretrained(DIR, subfolder="scheduler")',
            'DDIMScheduler.from_pretrained(DIR, subfolder="scheduler", timestep_spacing="trailing")')
        facts = {"method": art.spec.get("method", "dsm"), "teacher": "(trained from data)", "source": source,
                 "step": art.spec.get("step"), "steps": 40, "levels": [], "timesteps": "any (a diffusion model)",
                 "scheduler": "DDPMScheduler (any DDPM-compatible solver)", "tolerance": "n/a",
                 "conditioning": f"class labels 0..{net.num_classes - 1}" if net.num_classes else "none"}
        (tmp / CARD).write_text(_card(facts, code))
    return dest


def _write_lora(folder: Path, bare: Any, art: Any, sched: Any) -> None:
    """The adapter in diffusers' LoRA format (``unet.<module>.lora_A.weight`` ...) with its peft config."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    state = {k.replace(".default", ""): v.detach().cpu().contiguous()
             for k, v in bare.unet.state_dict().items() if "lora_" in k}
    cfg = bare.lora_config
    targets = sorted({k.split(".lora_")[0] for k in state})
    metadata = {"r": cfg["rank"], "lora_alpha": cfg["alpha"], "target_modules": targets}
    cls = StableDiffusionXLPipeline if len(art.components.text_encoders or []) == 2 else StableDiffusionPipeline
    cls.save_lora_weights(str(folder), unet_lora_layers=state, unet_lora_adapter_metadata=metadata,
                          safe_serialization=True)
    sched.save_pretrained(str(folder / "scheduler"))


__all__ = ["export_generator", "student_scheduler"]
