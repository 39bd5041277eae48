"""Export of multi-student (MSD) artefacts: routed by class label or by prompt (see :mod:`diffdistill.export`).

Each member becomes ``student_k/unet`` + ``student_k/scheduler``; ``router.json`` says which member serves
which condition; the artefact itself is copied to ``student/`` so ``diffdistill sample`` takes the folder; the
card's code routes each condition to its member with plain diffusers (one network evaluation per sample).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

from .errors import UserError
from .export_parts import CARD, _card, _check_text_components, _known_fid, _write_text_pipeline, student_scheduler
from .paths import atomic_folder


# --------------------------------------------------------------------------------------------------
# Routed (multi-student) artefacts
def _routed_code(sched_name: str, k: int, shape: tuple, num_classes: int, latent: bool) -> str:
    """The card's code: each label goes to its member (``router.json``), each member samples its own
    samples with its own UNet and scheduler, and the images are put back in label order."""
    c, h, w = shape
    vae = decode = ""
    if latent:
        vae = 'vae = AutoencoderKL.from_pretrained(DIR, subfolder="vae")\n'
        decode = "    images = vae.decode(images / vae.config.scaling_factor).sample\n"
    return f"""import json
import torch
from diffusers import {"AutoencoderKL, " if latent else ""}UNet2DModel, {sched_name}

DIR = "path/to/this/folder"
router = json.load(open(f"{{DIR}}/router.json"))  # which student serves which class label
members = [(UNet2DModel.from_pretrained(DIR, subfolder=f"{{m}}/unet"),
            {sched_name}.from_pretrained(DIR, subfolder=f"{{m}}/scheduler")) for m in router["members"]]
{vae}generator = torch.Generator().manual_seed(0)
labels = torch.arange(16) % {num_classes}  # classes 0..{num_classes - 1}
x = torch.randn((16, {c}, {h}, {w}), generator=generator)
member = torch.tensor(router["student_of_label"])[labels]
images = torch.empty_like(x)
with torch.no_grad():
    for k, (unet, scheduler) in enumerate(members):
        idx = (member == k).nonzero().squeeze(1)  # this student's samples; put back in place below
        if len(idx) == 0:
            continue
        scheduler.set_timesteps({k})  # the students' own {k} step(s)
        xk = x[idx] * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            out = unet(scheduler.scale_model_input(xk, t), t, class_labels=labels[idx]).sample
            xk = scheduler.step(out, t, xk, generator=generator).prev_sample
        images[idx] = xk
{decode}    images = (images.clamp(-1, 1) + 1) / 2  # [16, C, H, W] in [0, 1]
"""


def _member_parts(art: Any, steps: Optional[int], merge: bool, text: bool) -> tuple[list, list[float], str]:
    """``[(name, unet, scheduler)]`` per member (LoRA merged), the members' levels and scheduler class name.

    Every member must be a plain-x0 diffusers UNet of the expected kind (class-conditional pixel/latent
    ``UNet2DModel`` or, with ``text``, a text UNet); LoRA members need ``merge``."""
    from .artefact import _wrapper_of
    from .teachers.vp import VPUNetDenoiser

    kind = "diffusers text UNets" if text else "class-conditional diffusers UNets"
    parts, levels, sched_name = [], [], ""
    for entry, member in zip(art.spec["members"], art.model.members):
        name = entry["name"]
        wrapper, bare = _wrapper_of(member)
        is_text = bool(getattr(bare, "is_text", False))
        if wrapper["type"] != "plain" or not isinstance(bare, VPUNetDenoiser) or is_text != text:
            raise UserError(f"routed students export as {kind} with plain x0 outputs; member {name} is a "
                            f"{type(bare).__name__} with a {wrapper['type']} wrapper")
        if entry.get("lora") and not merge:
            raise UserError("routed LoRA students export as one full UNet per student: add --merge" if text else
                            "diffusers has no LoRA loader for a pixel UNet2DModel: export these LoRA students with "
                            "--merge (full weights)")
        levels = member.levels_for(steps) if steps is not None else list(member.levels)
        sched = student_scheduler(bare.scheduler_config, levels, member.renoise)
        sched_name = type(sched).__name__
        unet = bare.unet
        if entry.get("lora"):
            from .students import merge_lora

            unet = merge_lora(bare).unet
        parts.append((name, unet, sched))
    return parts, levels, sched_name


def export_routed(art: Any, folder: Path, dest: Path, checkpoint: str, source: Path, merge: bool,
                   steps: Optional[int]) -> Path:
    """A multi-student (MSD) artefact: one sub-folder per member (``student_k/unet``, ``student_k/scheduler``),
    ``router.json`` (label -> member), the artefact itself (``student/``, so ``diffdistill sample`` and
    ``load_generator`` take the folder) and a card whose code routes each label to its member.

    Students routed by prompt (a text teacher, ``msd.partition: pca``) go to :func:`_export_text_routed`."""
    from .artefact import _wrapper_of

    spec, model = art.spec, art.model
    if getattr(model, "text_partition", None) is not None:
        return _export_text_routed(art, folder, dest, checkpoint, source, merge, steps)
    names = [m["name"] for m in spec["members"]]
    latent = art.components is not None and art.components.vae is not None
    parts, levels, sched_name = _member_parts(art, steps, merge, text=False)
    bare = _wrapper_of(model.members[0])[1]
    n = bare.num_classes
    groups = [list(g) for g in model.groups]
    member_of = {c: k for k, g in enumerate(groups) for c in g}
    router = {"type": "classes", "members": names, "groups": groups,
              "student_of_label": [member_of.get(c, -1) for c in range(n)]}
    k = len(levels)
    shape = bare.sample_shape if not latent else art.components.image_shape
    timesteps = [round(float(t), 3) for t in parts[0][2].timesteps]
    facts = {"method": spec.get("method", "?"), "teacher": spec.get("teacher"), "source": checkpoint,
             "step": spec.get("step"), "steps": k, "levels": levels, "timesteps": timesteps,
             "scheduler": sched_name, "tolerance": "1e-4 (the same maths; float32 rounding only)",
             "conditioning": f"class labels 0..{n - 1}, routed to {len(names)} students (router.json)",
             "notes": [f"student {i} serves classes {', '.join(map(str, g))}" for i, g in enumerate(groups)]
             + ["one network evaluation per sample and step: each sample runs only its own student"]}
    fid = _known_fid(source, facts["method"], k)
    if fid is not None:
        facts.update(fid=fid, fid_source="diffdistill quickstart report.json")
    meta = {"num_classes": n, "sigma_data": bare.sigma_data, "exported_by": "diffdistill export",
            "method": facts["method"], "teacher": facts["teacher"], "router": router,
            "student": {"levels": levels, "renoise": model.renoise, "wrapper": {"type": "plain"}, "steps": k,
                        "scheduler": sched_name, "members": names}}
    with atomic_folder(dest) as tmp:
        for name, unet, sched in parts:
            unet.save_pretrained(str(tmp / name / "unet"), safe_serialization=True)
            sched.save_pretrained(str(tmp / name / "scheduler"))
        if latent:
            art.components.vae.save_pretrained(str(tmp / "vae"), safe_serialization=True)
        shutil.copytree(folder, tmp / "student")  # the artefact: diffdistill samples the export from it
        (tmp / "router.json").write_text(json.dumps(router, indent=2))
        (tmp / "diffdistill.json").write_text(json.dumps(meta, indent=2))
        (tmp / CARD).write_text(_card(facts, _routed_code(sched_name, k, tuple(shape), n, latent)))
    return dest


# Pooled prompt vectors the text router cuts (router.json "embedding"), as plain diffusers computes them
POOLED_DOCS = {
    "mean_of_prompt_embeds": "SD 1.5: the mean over tokens of pipe.encode_prompt(...)[0], the text encoder's last "
                             "hidden state that the UNet reads ([B, L, D] -> [B, D])",
    "pooled_prompt_embeds": "SDXL: pipe.encode_prompt(...)[2], text_encoder_2's projected pooled output ([B, D])",
}


def _text_routed_code(sched_name: str, steps: int, shape: tuple, sdxl: bool) -> str:
    """The card's code for prompt-routed students: encode the prompts with the pipeline, route each prompt's
    pooled vector down ``router.json``'s tree, sample each group with its own student's UNet and scheduler
    (one network evaluation per sample and step) and put the images back in prompt order."""
    c, h, w = shape
    if sdxl:
        encode = ("    embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,\n"
                  "                                              do_classifier_free_guidance=False)\n"
                  "    student = route(pooled)  # SDXL: text_encoder_2's pooled output is the routed vector\n")
        extra = "pooled_prompt_embeds=pooled[idx], "
    else:
        encode = ("    embeds, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,\n"
                  "                                   do_classifier_free_guidance=False)\n"
                  "    student = route(embeds.mean(dim=1))  # SD 1.5: the mean over tokens [B, L, D] -> [B, D]\n")
        extra = ""
    return f"""import json
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel, {sched_name}

DIR = "path/to/this/folder"
device = "cuda" if torch.cuda.is_available() else "cpu"
pipe = DiffusionPipeline.from_pretrained(DIR).to(device)  # VAE, text encoder(s), tokenizer(s); unet/ = student_0's
router = json.load(open(f"{{DIR}}/router.json"))  # which student serves which prompt
students = [(UNet2DConditionModel.from_pretrained(DIR, subfolder=f"{{m}}/unet").to(device),
             {sched_name}.from_pretrained(DIR, subfolder=f"{{m}}/scheduler")) for m in router["members"]]


def route(pooled):
    \"\"\"The student of each pooled prompt vector [B, D]: down router.json's tree of principal-component cuts.\"\"\"
    proj = (pooled.float().cpu() - torch.tensor(router["mean"])) @ torch.tensor(router["components"]).T
    out = []
    for p in proj:
        node = router["tree"]
        while "student" not in node:
            node = node["left"] if p[node["axis"]] < node["threshold"] else node["right"]
        out.append(node["student"])
    return torch.tensor(out)


prompts = ["a photo of a cat", "a watercolour of a harbour at dawn", "an astronaut riding a horse"]
with torch.no_grad():
{encode}generator = torch.Generator().manual_seed(0)
latents = torch.randn((len(prompts), {c}, {h}, {w}), generator=generator)
images = [None] * len(prompts)
for k, (unet, scheduler) in enumerate(students):
    idx = (student == k).nonzero().squeeze(1).tolist()  # this student's prompts; put back in place below
    if not idx:
        continue
    pipe.unet, pipe.scheduler = unet, scheduler
    out = pipe(prompt_embeds=embeds[idx], {extra}latents=latents[idx].to(device), num_inference_steps={steps},
               guidance_scale=0, generator=generator, output_type="pt").images  # the students' own {steps} step(s)
    for i, image in zip(idx, out):
        images[i] = image.cpu()
images = torch.stack(images)  # [N, 3, H, W] in [0, 1], in prompt order
pil_images = pipe.numpy_to_pil(images.permute(0, 2, 3, 1).numpy())
"""


def _export_text_routed(art: Any, folder: Path, dest: Path, checkpoint: str, source: Path, merge: bool,
                        steps: Optional[int]) -> Path:
    """Students routed by prompt (MSD on a latent SD 1.5 / SDXL teacher, ``msd.partition: pca``).

    The folder is a StableDiffusion(XL)Pipeline folder for the shared parts (``vae/``, text encoders,
    tokenizers, ``model_index.json``; its ``unet/`` and ``scheduler/`` are member 0's, so
    ``DiffusionPipeline.from_pretrained(dir)`` loads), plus ``student_k/unet`` and ``student_k/scheduler`` for
    every member, ``router.json`` (the :class:`~diffdistill.partitions.PCAPartition` tree, the member names and
    which pooled prompt vector it cuts, ``POOLED_DOCS``), the artefact (``student/``) and a card whose code
    encodes the prompts with the pipeline, routes each one and samples it with its own student."""
    from .artefact import _wrapper_of

    _check_text_components(art)  # a pixel text teacher (no VAE): one line
    spec, model = art.spec, art.model
    names = [m["name"] for m in spec["members"]]
    parts, levels, sched_name = _member_parts(art, steps, merge, text=True)
    bare = _wrapper_of(model.members[0])[1]
    sdxl = len(art.components.text_encoders) == 2
    pooled = "pooled_prompt_embeds" if sdxl else "mean_of_prompt_embeds"
    router = {**model.text_partition.to_json(), "members": names, "embedding": pooled,
              "embedding_doc": POOLED_DOCS[pooled],
              "rule": "proj = (v - mean) @ components.T; at each node go left if proj[axis] < threshold "
                      "(float32), until a leaf {student: k}; members[k] samples the prompt"}
    k = len(levels)
    timesteps = [round(float(t), 3) for t in parts[0][2].timesteps]
    n_students = len(names)
    facts = {"method": spec.get("method", "?"), "teacher": spec.get("teacher"), "source": checkpoint,
             "step": spec.get("step"), "steps": k, "levels": levels, "timesteps": timesteps,
             "scheduler": sched_name, "tolerance": "1e-4 (the same maths; float32 rounding only)",
             "conditioning": f"text prompts, routed to {n_students} students by their pooled text embedding "
                             "(router.json)",
             "notes": [("router.json: a balanced tree of cuts along the top principal components of the training "
                        "prompts' pooled vectors, walked by route() above; the pooled vector is "
                        f"{POOLED_DOCS[pooled]}"),
                       ("the top-level unet/ and scheduler/ are student_0's: DiffusionPipeline.from_pretrained "
                        "alone samples every prompt with student 0, so route prompts as above"),
                       "one network evaluation per sample and step: each prompt runs only its own student",
                       "guidance is distilled in: sample with guidance_scale=0"]}
    fid = _known_fid(source, facts["method"], k)
    if fid is not None:
        facts.update(fid=fid, fid_source="diffdistill quickstart report.json")
    meta = {"num_classes": None, "sigma_data": bare.sigma_data, "exported_by": "diffdistill export",
            "method": facts["method"], "teacher": facts["teacher"],
            "router": {"type": "text_pca", "file": "router.json", "members": names, "embedding": pooled},
            "student": {"levels": levels, "renoise": model.renoise, "wrapper": {"type": "plain"}, "steps": k,
                        "scheduler": sched_name, "members": names}}
    with atomic_folder(dest) as tmp:
        _write_text_pipeline(tmp, parts[0][1], art, parts[0][2])
        for name, unet, sched in parts:
            unet.save_pretrained(str(tmp / name / "unet"), safe_serialization=True)
            sched.save_pretrained(str(tmp / name / "scheduler"))
        shutil.copytree(folder, tmp / "student")  # the artefact: diffdistill samples the export from it
        (tmp / "router.json").write_text(json.dumps(router, indent=2))
        (tmp / "diffdistill.json").write_text(json.dumps(meta, indent=2))
        code = _text_routed_code(sched_name, k, tuple(bare.sample_shape), sdxl)
        (tmp / CARD).write_text(_card(facts, code))
    return dest
