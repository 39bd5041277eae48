"""CLIP text encoders of Stable Diffusion 1.5 / SDXL teachers: loading and prompt encoding.

SD 1.5 conditions its UNet on the last hidden state (after the final layer norm) of one CLIP text
encoder. SDXL concatenates the *penultimate* hidden states of two encoders (768 + 1280 channels) and adds
the second encoder's projected pooled output plus six "time ids" (original size, crop offset, target size)
through ``added_cond_kwargs`` — as diffusers' ``StableDiffusionXLPipeline.encode_prompt`` does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..denoiser import TextCond
from ..errors import UserError


def text_encoder_class(folder: Path, default: str) -> type:
    """The transformers class named in ``folder/config.json``'s ``architectures`` (or ``default``)."""
    import transformers

    try:
        name = (json.loads((folder / "config.json").read_text()).get("architectures") or [default])[0]
    except json.JSONDecodeError as e:
        raise UserError(f"{folder / 'config.json'} is not valid JSON ({e.msg})") from None
    if name not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
        raise UserError(f"{folder / 'config.json'} names text encoder {name!r}; diffdistill loads CLIPTextModel "
                        "and CLIPTextModelWithProjection")
    return getattr(transformers, name)


def load_text_stack(root: Path, names: Sequence[tuple[str, str, str]], dtype: torch.dtype,
                    variants: Optional[Sequence[Optional[str]]] = None) -> tuple[list, list[nn.Module]]:
    """Load ``(tokenizer folder, encoder folder, default class)`` triples under ``root`` (local files only).

    ``variants``: the weights variant of each encoder (``"fp16"`` for ``model.fp16.safetensors``) or ``None``.
    """
    from transformers import CLIPTokenizer

    tokenizers, encoders = [], []
    for (tok_dir, enc_dir, default), variant in zip(names, variants or [None] * len(names)):
        try:
            tokenizers.append(CLIPTokenizer.from_pretrained(str(root / tok_dir), local_files_only=True))
        except Exception as e:
            raise UserError(f"cannot load the tokenizer in {root / tok_dir} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
        cls = text_encoder_class(root / enc_dir, default)
        try:
            enc = cls.from_pretrained(str(root / enc_dir), dtype=dtype, local_files_only=True, variant=variant)
        except Exception as e:
            raise UserError(f"cannot load the text encoder in {root / enc_dir} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
        encoders.append(enc)
    return tokenizers, encoders


@torch.no_grad()
def encode_text(prompts: Sequence[str], tokenizers: Sequence, encoders: Sequence[nn.Module],
                penultimate: bool) -> tuple[Tensor, Optional[Tensor]]:
    """Encode ``prompts`` with every (tokenizer, encoder) pair.

    Returns ``(embeds [B, L, sum D_i], pooled)``: with ``penultimate`` (SDXL) the hidden states before the
    last layer, concatenated along channels, and the last encoder's projected pooled output
    (``text_embeds``); otherwise (SD 1.5) the single encoder's last hidden state and ``pooled=None``.
    """
    embeds, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, encoders):
        ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(encoder.device)
        out = encoder(ids, output_hidden_states=penultimate)
        if penultimate:
            embeds.append(out.hidden_states[-2])
            pooled = out.text_embeds if getattr(out, "text_embeds", None) is not None else out.pooler_output
        else:
            embeds.append(out.last_hidden_state)
    return torch.cat(embeds, dim=-1), (None if not penultimate else pooled)


def sdxl_time_ids(height: int, width: int, batch: int, device: torch.device | str = "cpu") -> Tensor:
    """SDXL micro-conditioning ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)`` = ``(H, W, 0, 0, H, W)``."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32, device=device).repeat(batch, 1)


def prompt_cond(prompts: Sequence[str], tokenizers: Sequence, encoders: Sequence[nn.Module], sdxl: bool,
                image_hw: tuple[int, int]) -> TextCond:
    """The :class:`TextCond` a SD 1.5 (``sdxl=False``) or SDXL UNet consumes for ``prompts``."""
    embeds, pooled = encode_text(prompts, tokenizers, encoders, penultimate=sdxl)
    time_ids = sdxl_time_ids(*image_hw, len(prompts), embeds.device) if sdxl else None
    return TextCond(embeds, pooled, time_ids)
