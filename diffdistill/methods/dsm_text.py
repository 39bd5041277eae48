"""Text-to-image teacher training (``diffdistill teacher train`` with ``dsm.text_encoder`` set).

The network is a pixel-space diffusers ``UNet2DConditionModel`` (cross-attention on the text) and a
small ``transformers.CLIPTextModel`` trained jointly with it (``dsm.train_text_encoder: true``, the
default; ``false`` keeps the randomly initialised encoder frozen). The tokenizer is built here with no
download (:func:`diffdistill.teachers.pixel_text.build_tokenizer`). The loss is :class:`~.dsm.DSM`'s
(DDPM's, through the denoiser contract), conditioned on a caption drawn afresh at every step for each
image from its class's training phrasings (``class_phrasings`` of the dataset, e.g. digits:
:mod:`diffdistill.data.digits_text`); with probability ``dsm.label_dropout`` the caption is the empty
prompt, for classifier-free guidance. The run writes a pipeline folder (``RUN/teacher``) that
:func:`diffdistill.teachers.load_teacher` loads as a pixel text teacher.

Checkpoints hold the joint network (``student.safetensors``: ``den.unet.*`` + ``text_encoder.*``); their
student artefact is the UNet alone, whose text stack is the run's ``teacher/`` folder (``teacher.path``
is set to it when empty), so ``load_generator(RUN)`` samples the newest checkpoint with prompts.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import torch

from ..errors import UserError
from ..students import Student
from .base import Batch, StepOutput
from .dsm import DSM, DSMConfig


def _tokenizer_words(data) -> list[str]:
    """The general English word list plus every word of the data's training phrasings."""
    from ..teachers.pixel_text import GENERAL_WORDS

    words = set(GENERAL_WORDS)
    for row in data.class_phrasings:
        for p in row:
            words.update(w for w in p.lower().replace(",", " ").split() if w.isalpha())
    return sorted(words)


class TextDSM(DSM):
    """Denoising score matching of a text-conditional UNet and its text encoder (module docstring)."""

    def __init__(self, student: Student, config: DSMConfig, optim=None, total_steps: int = 1000,
                 meta: Optional[dict] = None, tokenizer=None, phrase_ids: Optional[torch.Tensor] = None) -> None:
        super().__init__(student, config, optim, total_steps, meta)
        self.tokenizer = tokenizer
        self.phrase_ids = phrase_ids  # [classes, phrasings, L] token ids of every training phrasing
        self._noise_ids: Optional[torch.Tensor] = None  # the token ids caption noise draws from

    @classmethod
    def from_config(cls, cfg, optim, device):
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel

        from ..data import build_dataset
        from ..teachers import VPUNetDenoiser
        from ..teachers.pixel_text import TextTeacherNet, build_tokenizer, text_encoder_config, tokenize

        c: DSMConfig = cfg.method_config
        data = build_dataset(cfg.data)
        phrasings = getattr(data, "class_phrasings", None)
        if not phrasings:
            raise UserError(f"dsm.text_encoder is set but the {cfg.data.name} data has no class phrasings to caption "
                            "its images with (data.name=digits has them)")
        run_dir = Path(cfg.output_dir)
        with tempfile.TemporaryDirectory() as tmp:  # written again with the pipeline folder
            tokenizer = build_tokenizer(tmp, _tokenizer_words(data), c.text_max_length)
        try:
            text_encoder = CLIPTextModel(text_encoder_config(tokenizer, **c.text_encoder))
        except (TypeError, ValueError) as e:
            raise UserError(f"dsm.text_encoder is not a valid CLIPTextConfig: {e}") from None
        text_encoder.requires_grad_(bool(c.train_text_encoder))
        channels = cfg.data.channels or int(data.channels)
        kwargs = {"cross_attention_dim": text_encoder.config.hidden_size, **c.unet}
        kwargs.update(sample_size=cfg.data.resolution, in_channels=channels, out_channels=channels)
        try:
            unet = UNet2DConditionModel(**kwargs)
        except (TypeError, ValueError) as e:
            raise UserError(f"dsm.unet is not a valid UNet2DConditionModel config: {e}") from None
        if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
            raise UserError(f"dsm.unet.cross_attention_dim={unet.config.cross_attention_dim} must equal the text "
                            f"encoder's hidden_size={text_encoder.config.hidden_size}")
        scheduler = DDPMScheduler(num_train_timesteps=c.num_train_timesteps, beta_schedule=c.beta_schedule,
                                  beta_start=c.beta_start, beta_end=c.beta_end, prediction_type=c.prediction_type)
        den = VPUNetDenoiser(unet, scheduler.config)
        null_ids = tokenize(tokenizer, [""])
        num_classes = len(phrasings)
        net = TextTeacherNet(den, text_encoder, null_ids, num_classes).to(device)
        ids = tokenize(tokenizer, [p for row in phrasings for p in row]).reshape(num_classes, len(phrasings[0]), -1)
        if not cfg.teacher.path:  # the checkpoints' artefacts take their text stack from the run's teacher folder
            cfg.teacher.path = str((run_dir / "teacher").resolve())
        meta = {"sigma_data": 0.5, "data": cfg.data.name, "resolution": cfg.data.resolution, "channels": channels,
                "text": True, "train_text_encoder": bool(c.train_text_encoder), "label_dropout": c.label_dropout,
                "caption_noise": c.caption_noise, "caption_noise_tokens": c.caption_noise_tokens,
                "train_phrasings": phrasings, "trained_by": "diffdistill teacher train"}
        heldout = getattr(data, "heldout_phrasings", None)
        if heldout:
            meta["heldout_phrasings"] = heldout
        student = Student(net, [den.sigma_max])
        return cls(student, c, optim, cfg.train.steps, meta, tokenizer, ids.to(device)), None

    def train_step(self, batch: Batch, step: int) -> StepOutput:
        c: DSMConfig = self.config
        net = self.student.net
        x0 = batch.images
        b = x0.shape[0]
        labels = batch.cond
        if labels is None or not isinstance(labels, torch.Tensor) or labels.ndim != 1:
            raise UserError("text-teacher training needs labelled images (one class per image, to caption it)")
        t = batch.randint(len(net.sigmas), (b,))
        sigma = net.sigmas[t.to(net.sigmas.device)].to(x0.device)
        noise = batch.randn(x0.shape, device=x0.device)
        k = batch.randint(self.phrase_ids.shape[1], (b,), device=self.phrase_ids.device)
        ids = self.phrase_ids[labels.to(self.phrase_ids.device), k]
        drop = torch.zeros(b, dtype=torch.bool, device=ids.device)
        if c.label_dropout > 0:
            drop = batch.rand((b,), device=ids.device) < c.label_dropout
            ids = torch.where(drop[:, None], net.null_ids.to(ids.device).expand_as(ids), ids)
        if c.caption_noise > 0:
            ids = self.caption_noise(ids, ~drop, batch)
        x0_hat = self.wrapped["student"](x0 + sigma.view(-1, *[1] * (x0.ndim - 1)) * noise, sigma, ids)
        weight = {"v_prediction": (1 + sigma**2) / sigma**2, "epsilon": 1 / sigma**2,
                  "sample": torch.ones_like(sigma)}[c.prediction_type]
        per_sample = ((x0_hat - x0) ** 2).flatten(1).mean(1)
        loss = (weight * per_sample).mean()
        return StepOutput({"student": loss}, {"loss": float(loss.detach())})

    def caption_noise(self, ids: torch.Tensor, eligible: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Insert 1..``caption_noise_tokens`` random vocabulary tokens at random places of the captions chosen
        with probability ``caption_noise`` among ``eligible`` (not the empty prompt): the encoder learns that
        words which say nothing about the image change nothing (any word, or sub-word piece, of the vocabulary)."""
        c: DSMConfig = self.config
        tok = self.tokenizer
        b, length = ids.shape
        if self._noise_ids is None:
            special = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
            self._noise_ids = torch.tensor([i for i in range(len(tok)) if i not in special], device=ids.device)
        chosen = (batch.rand((b,), device=ids.device) < c.caption_noise) & eligible
        count = 1 + batch.randint(c.caption_noise_tokens, (b,), device=ids.device)
        arange = torch.arange(length, device=ids.device)
        for j in range(c.caption_noise_tokens):
            words = (ids != tok.eos_token_id).sum(1)  # start token + words (padding is the end token)
            pos = 1 + (batch.rand((b,), device=ids.device) * words).long().clamp(max=words - 1)
            token = self._noise_ids[batch.randint(len(self._noise_ids), (b,), device=ids.device)]
            active = chosen & (count > j) & (words < length - 1)
            shifted = torch.cat([ids[:, :1], ids[:, :-1]], dim=1)
            new = torch.where(arange < pos[:, None], ids, torch.where(arange == pos[:, None], token[:, None], shifted))
            ids = torch.where(active[:, None], new, ids)
        return ids

    def generator(self):
        """The text-conditional denoiser (sampled with an ODE solver; no prompt = the empty prompt)."""
        return self.student.net.sampling_denoiser()

    def save_artifacts(self, run_dir) -> None:
        """Write the pipeline folder ``RUN/teacher`` (with the EMA weights when EMA is on: the loop calls this
        inside ``Stepper.ema_weights()``)."""
        from diffusers import DDPMScheduler

        from ..teachers.pixel_text import save_pixel_text_teacher

        net = self.student.net
        scheduler = DDPMScheduler.from_config(net.den.scheduler_config)
        save_pixel_text_teacher(net.den.unet, net.text_encoder, self.tokenizer, scheduler, Path(run_dir) / "teacher",
                                self.meta)


class DSMEntry(DSM):
    """The registry's ``dsm``: a :class:`TextDSM` when ``dsm.text_encoder`` is set, a plain :class:`DSM` otherwise.

    The choice lives here, not in ``DSM.from_config``, so that ``dsm`` never imports ``dsm_text``.
    """

    @classmethod
    def from_config(cls, cfg, optim, device):
        chosen = TextDSM if cfg.method_config.text_encoder else DSM
        return chosen.from_config(cfg, optim, device)


METHOD = DSMEntry
