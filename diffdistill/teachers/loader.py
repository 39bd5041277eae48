"""Load a teacher (UNet + schedule, and for latent models its VAE and text encoders) from a folder.

Supported layouts (all read with ``from_pretrained(..., local_files_only=True)``):

(a) diffdistill's own teacher folder: a diffusers ``UNet2DModel`` folder (``config.json`` +
    ``diffusion_pytorch_model.safetensors``) that also holds ``scheduler_config.json`` and ``diffdistill.json``
    (``{"num_classes": 10, "sigma_data": 0.5, ...}``; the UNet has ``num_class_embeds = num_classes + 1``);
(b) a diffusers pipeline folder: ``model_index.json`` + ``unet/`` + ``scheduler/`` (``DDPMPipeline``...);
(c) Stable Diffusion 1.5 / SDXL: ``unet/ vae/ text_encoder/ tokenizer/ scheduler/`` (+ ``text_encoder_2/
    tokenizer_2/``); without ``vae/`` and with no ``vae`` entry in ``model_index.json``, a pixel-space text
    teacher (``assets/teachers/digits_text``, :mod:`diffdistill.teachers.pixel_text`);
(d) a run folder written by ``diffdistill teacher train``: its ``teacher/`` sub-folder is layout (a);
(e) a Hub id: downloaded (needs network), then (b)/(c);
(f) an EDM teacher folder: ``edm.json`` + ``model.safetensors`` (EDM's SongUNet / ADM networks; written by
    ``diffdistill convert edm SNAPSHOT.pkl``, see :mod:`diffdistill.teachers.edm`).

Every missing or unreadable file is a :class:`UserError` naming the file and where it was expected.
Weights load from safetensors only (never unpickled).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch

from ..denoiser import TextCond
from ..errors import UserError
from ..students import freeze
from .bundle import Teacher
from .edm import EDM_FILE, load_edm_folder
from .text import load_text_stack
from .vp import UNET_CLASSES, VPUNetDenoiser

META_FILE = "diffdistill.json"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Only what load_teacher reads (no safety checker, no fp16 / EMA variants, no single-file checkpoints).
HUB_PATTERNS = ["model_index.json", "config.json", "scheduler_config.json", "diffdistill.json",
                "diffusion_pytorch_model.safetensors", "scheduler/*", "tokenizer*/*"] + [
    f"{sub}/{name}" for sub in ("unet", "vae", "text_encoder", "text_encoder_2")
    for name in ("config.json", "*.safetensors.index.json", "diffusion_pytorch_model.safetensors",
                 "diffusion_pytorch_model-*-of-*.safetensors", "model.safetensors", "model-*-of-*.safetensors")]


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object")
    return data


def _require(root: Path, rel: str, expected: str) -> Path:
    path = root / rel
    if not path.is_file():
        raise UserError(f"teacher folder {root} has no {rel} (expected {expected})")
    return path


def _weights(root: Path, sub: str, stem: str, expected: str) -> Optional[str]:
    """Check ``root/sub`` holds safetensors weights ``stem*.safetensors``; return the variant (or ``None``).

    Every safetensors header is opened, so a truncated or corrupt file is reported by name here instead
    of deep inside ``from_pretrained``.
    """
    from safetensors import safe_open

    folder = root / sub if sub else root
    rel = f"{sub}/" if sub else ""
    files = sorted(folder.glob(f"{stem}*.safetensors")) if folder.is_dir() else []
    if not files:
        pickles = sorted(folder.glob(f"{stem}*.bin")) if folder.is_dir() else []
        hint = f"; found {rel}{pickles[0].name}, which diffdistill will not unpickle: re-save it with " \
               "safe_serialization=True" if pickles else ""
        raise UserError(f"teacher folder {root} has no {rel}{stem}.safetensors (expected {expected}){hint}")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                handle.keys()
        except Exception as e:
            raise UserError(f"teacher weights file {f} is corrupt or not a safetensors file ({_one_line(e)})") from None
    exact = folder / f"{stem}.safetensors"
    if exact.is_file() or (folder / f"{stem}.safetensors.index.json").is_file() or \
            any(re.fullmatch(rf"{re.escape(stem)}-\d+-of-\d+\.safetensors", f.name) for f in files):
        return None
    variant = files[0].name[len(stem) + 1:].split(".")[0]  # stem.<variant>.safetensors
    return variant or None


def _load(cls: Any, root: Path, sub: str, variant: Optional[str], dtype: torch.dtype) -> Any:
    """``cls.from_pretrained`` from local files, with a one-line :class:`UserError` on failure."""
    try:
        kwargs = {"subfolder": sub} if sub else {}
        return cls.from_pretrained(str(root), torch_dtype=dtype, local_files_only=True, variant=variant, **kwargs)
    except Exception as e:
        raise UserError(f"cannot load {cls.__name__} from {root / sub if sub else root} ({_one_line(e)})") from None


def _unet_class(config_path: Path) -> type:
    import diffusers

    name = _read_json(config_path).get("_class_name")
    if name not in UNET_CLASSES:
        raise UserError(f"{config_path} describes a {name!r}; diffdistill loads teachers whose network is a "
                        f"{' or '.join(UNET_CLASSES)}")
    return getattr(diffusers, name)


def _scheduler_config(path: Path) -> dict:
    config = _read_json(path)
    if "FlowMatch" in str(config.get("_class_name", "")):
        raise UserError(f"{path} is a flow-matching schedule; load_teacher reads DDPM-style (VP) teachers — "
                        "wrap flow models with diffdistill.teachers.FlowMatchingDenoiser in Python")
    return config


def resolve_teacher_path(path: str | os.PathLike) -> Path:
    """A local folder for ``path``: the folder itself (shipped ``assets/...`` found from any folder), or a Hub
    id's downloaded snapshot."""
    from ..paths import resolve_path

    p = Path(resolve_path(str(path))).expanduser()
    if p.exists():
        if not p.is_dir():
            raise UserError(f"teacher path {p} is a file; expected a folder (a diffusers pipeline or UNet folder, "
                            "or a run folder of `diffdistill teacher train`)")
        return p
    text = str(path)
    if not HUB_ID.match(text):
        raise UserError(f"teacher path {text} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, allow_patterns=HUB_PATTERNS))
    except Exception as e:
        raise UserError(f"teacher path {text!r} does not exist locally and could not be downloaded from the "
                        f"Hugging Face Hub ({_one_line(e)})") from None


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise UserError(f"unknown dtype {dtype!r} (use float32, bfloat16 or float16)")
    return value


def load_teacher(path: str | os.PathLike, device: torch.device | str = "cpu",
                 dtype: torch.dtype | str = torch.float32, with_unet: bool = True) -> Teacher:
    """Load a frozen teacher from any supported layout (see the module docstring) onto ``device``.

    ``dtype`` is the weights dtype of the UNet and text encoders (the VAE stays float32 when its config
    asks for ``force_upcast``, as SDXL's does). ``with_unet=False`` loads only what a student needs around
    its own network — VAE, text encoders, tokenizers, the empty-prompt encoding (``Teacher.null_text``) —
    and leaves ``denoiser`` ``None`` (pixel teachers then carry nothing but their metadata).
    """
    dtype = _as_dtype(dtype)
    root = resolve_teacher_path(path)
    if (root / "teacher").is_dir() and not (root / "config.json").is_file() and not (root / "unet").is_dir():
        root = root / "teacher"  # (d) a run folder of `diffdistill teacher train`
    if (root / "unet").is_dir() or (root / "model_index.json").is_file():
        teacher = _load_pipeline_folder(root, dtype, with_unet)
    elif (root / EDM_FILE).is_file():
        teacher = load_edm_folder(root, dtype, with_unet)
    elif (root / "config.json").is_file():
        teacher = _load_unet_folder(root, dtype, with_unet)
    elif (root / "transformer").is_dir():
        raise UserError(f"teacher folder {root} has a transformer/ but no unet/config.json: load_teacher reads UNet "
                        "teachers; wrap other networks in Python (diffdistill.teachers.FlowMatchingDenoiser)")
    else:
        raise UserError(f"teacher folder {root} has no unet/config.json (expected a diffusers pipeline folder with "
                        "model_index.json and unet/, a UNet folder with config.json, an EDM teacher folder with "
                        "edm.json, or a run folder with teacher/)")
    teacher.path = str(path)
    for module in [teacher.denoiser, teacher.vae, *(teacher.text_encoders or [])]:
        if module is not None:
            freeze(module)
    return teacher.to(device)


def _load_unet_folder(root: Path, dtype: torch.dtype, with_unet: bool = True) -> Teacher:
    """Layout (a): ``config.json`` + weights + ``scheduler_config.json`` (+ ``diffdistill.json``)."""
    unet_cls = _unet_class(root / "config.json")
    sched = _scheduler_config(_require(root, "scheduler_config.json", "the DDPMScheduler config saved next to the UNet"))
    meta = _read_json(root / META_FILE) if (root / META_FILE).is_file() else {}
    if not with_unet:
        return Teacher(denoiser=None, kind="unet", path=str(root), num_classes=meta.get("num_classes"), meta=meta)
    variant = _weights(root, "", "diffusion_pytorch_model", "the UNet weights saved by save_pretrained")
    unet = _load(unet_cls, root, "", variant, dtype)
    return _pixel_teacher(unet, sched, meta, root)


def _pixel_teacher(unet: Any, sched: dict, meta: dict, root: Path) -> Teacher:
    try:
        denoiser = VPUNetDenoiser(unet, sched, meta.get("num_classes"), float(meta.get("sigma_data", 0.5)))
    except ValueError as e:
        raise UserError(f"teacher folder {root}: {e}") from None
    return Teacher(denoiser=denoiser, kind="unet", path=str(root), num_classes=denoiser.num_classes,
                   image_shape=denoiser.sample_shape, meta=meta)


def _load_pipeline_folder(root: Path, dtype: torch.dtype, with_unet: bool = True) -> Teacher:
    """Layouts (b) and (c): a diffusers pipeline folder."""
    from diffusers import AutoencoderKL

    index = _read_json(root / "model_index.json") if (root / "model_index.json").is_file() else {}

    def has(name: str) -> bool:  # a component folder, or a non-null model_index.json entry
        return (root / name).is_dir() or bool(index.get(name) and index[name][0])

    unet_cls = _unet_class(_require(root, "unet/config.json", "a diffusers UNet folder saved by save_pretrained"))
    unet_variant = _weights(root, "unet", "diffusion_pytorch_model", "the UNet weights saved by save_pretrained")
    sched = _scheduler_config(_require(root, "scheduler/scheduler_config.json", "the pipeline's scheduler config"))
    meta = _read_json(root / META_FILE) if (root / META_FILE).is_file() else {}
    is_text = unet_cls.__name__ == "UNet2DConditionModel"
    # A text pipeline whose model_index.json names no VAE works on pixels (diffdistill's digits_text teacher).
    pixel_text = is_text and bool(index) and not has("vae") and "vae" not in index
    latent = has("vae") or (is_text and not pixel_text)
    if has("vqvae"):
        raise UserError(f"teacher folder {root} has a VQ-VAE (vqvae/); diffdistill loads pixel and KL-VAE latent teachers")
    if latent:
        _require(root, "vae/config.json", "the AutoencoderKL of a latent teacher")
        if _read_json(root / "vae/config.json").get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise UserError(f"{root / 'vae/config.json'} is not an AutoencoderKL; diffdistill loads KL-VAE teachers")
    stack: list[tuple[str, str, str]] = []
    text_variants: list[Optional[str]] = []
    if is_text:
        stack.append(("tokenizer", "text_encoder", "CLIPTextModel"))
        if has("text_encoder_2"):
            stack.append(("tokenizer_2", "text_encoder_2", "CLIPTextModelWithProjection"))
        for tok_dir, enc_dir, _ in stack:
            _require(root, f"{enc_dir}/config.json", "a transformers CLIP text encoder saved by save_pretrained")
            text_variants.append(_weights(root, enc_dir, "model", "the text encoder weights"))
            if not ((root / tok_dir / "tokenizer.json").is_file() or (root / tok_dir / "vocab.json").is_file()):
                raise UserError(f"teacher folder {root} has no {tok_dir}/vocab.json (expected a CLIP tokenizer: "
                                "vocab.json + merges.txt, or tokenizer.json)")
    vae_variant = _weights(root, "vae", "diffusion_pytorch_model", "the VAE weights") if latent else None

    if not is_text and not has("vae") and not with_unet:
        return Teacher(denoiser=None, kind="unet", path=str(root), num_classes=meta.get("num_classes"), meta=meta)
    unet = _load(unet_cls, root, "unet", unet_variant, dtype) if with_unet else None
    if not is_text and not has("vae"):
        return _pixel_teacher(unet, sched, meta, root)

    vae = _load(AutoencoderKL, root, "vae", vae_variant, dtype) if latent else None
    if vae is not None and vae.config.get("force_upcast", False) and dtype == torch.float16:
        vae = vae.float()  # SDXL's VAE overflows in fp16
    factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    denoiser = None
    if unet is not None:
        try:
            denoiser = VPUNetDenoiser(unet, sched, meta.get("num_classes"), float(meta.get("sigma_data", 0.5)))
        except ValueError as e:
            raise UserError(f"teacher folder {root}: {e}") from None
    from .vp import _sample_hw

    unet_config = _read_json(root / "unet/config.json")
    h, w = _sample_hw(unet_config.get("sample_size"))
    vae_config = vae.config if vae is not None else {}
    channels = int(vae_config["out_channels"]) if vae is not None else int(unet_config.get("in_channels", 4))
    teacher = Teacher(denoiser=denoiser, kind="unet", path=str(root), vae=vae,
                      vae_scaling_factor=float(vae_config.get("scaling_factor") or 1.0),
                      vae_shift_factor=float(vae_config.get("shift_factor") or 0.0),
                      num_classes=meta.get("num_classes") if denoiser is None else denoiser.num_classes,
                      image_shape=(channels, h * factor, w * factor), meta=meta)
    if is_text:
        teacher.tokenizers, teacher.text_encoders = load_text_stack(root, stack, dtype, text_variants)
        teacher.kind = "sdxl" if len(stack) == 2 else "sd"
        # SDXL pipelines use an all-zero negative embedding for "" (force_zeros_for_empty_prompt).
        zeros = teacher.kind == "sdxl" and index.get("force_zeros_for_empty_prompt", True)
        null = teacher.encode_prompts([""])
        if zeros:  # the micro-conditioning time ids stay as they are
            null = TextCond(torch.zeros_like(null.embeds), torch.zeros_like(null.pooled), null.time_ids)
        teacher.null_text = null
        if denoiser is not None:
            denoiser.null_text = null
    return teacher


def save_teacher_folder(unet: Any, scheduler: Any, folder: str | os.PathLike, meta: dict) -> Path:
    """Write layout (a) atomically: a temporary folder renamed into place (an old folder is replaced).

    ``scheduler``: a diffusers scheduler or a DDPMScheduler config dict. ``meta`` goes to
    ``diffdistill.json`` (e.g. ``{"num_classes": 10, "sigma_data": 0.5}``).
    """
    if not hasattr(scheduler, "save_pretrained"):
        from .vp import ddpm_from_config

        scheduler = ddpm_from_config(scheduler)
    from ..paths import atomic_folder

    with atomic_folder(folder) as tmp:
        unet.save_pretrained(str(tmp), safe_serialization=True)
        scheduler.save_pretrained(str(tmp))  # scheduler_config.json
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return Path(folder)
