"""Teacher training: denoising score matching of a diffusers ``UNet2DModel`` (``diffdistill teacher train``).

The network is a class-conditional (or unconditional) ``UNet2DModel`` with a DDPM schedule (linear betas
1e-4..0.02, 1000 steps, DDPM's choice) and v- (default) or epsilon-prediction, saved as a plain diffusers
folder that ``UNet2DModel.from_pretrained`` and ``DDPMScheduler.from_pretrained`` load.

The loss is DDPM's: timesteps uniform over the 1000 levels, MSE on the network's prediction target. It is
written through the denoiser contract, which is exact: with ``x = x0 + sigma n`` and the adapter's x0,
``||v_hat - v||^2 = (1 + sigma^2) / sigma^2 * ||x0_hat - x0||^2`` and ``||eps_hat - eps||^2 =
||x0_hat - x0||^2 / sigma^2`` — so the forward pass goes through the (DDP-wrapped) denoiser like every
other method. Classifier-free guidance is enabled by dropping labels to the null class ``num_classes``
with probability ``label_dropout`` (Ho & Salimans 2022).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Optional

import torch

from ..errors import UserError
from ..schema import Count, Interval, Keys, PositiveInt, Probability
from ..students import Student
from .base import Batch, Method, StepOutput


def _default_unet() -> dict:
    return {"block_out_channels": [32, 64], "layers_per_block": 1,
            "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
            "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
            "norm_num_groups": 16, "attention_head_dim": 16}


def _unet_keys() -> list[str]:
    from ..teachers.vp import unet_config_keys

    return unet_config_keys()  # UNet2DModel, or UNet2DConditionModel for a text teacher (dsm.text_encoder)


def _clip_text_keys() -> list[str]:
    import inspect

    from transformers import CLIPTextConfig

    return [k for k in inspect.signature(CLIPTextConfig.__init__).parameters if k not in ("self", "kwargs")]


@dataclass
class DSMConfig:
    # UNet2DModel kwargs; UNet2DConditionModel kwargs with dsm.text_encoder (size and channels follow the data)
    unet: Annotated[dict, Keys(_unet_keys, "diffusers UNet2DModel / UNet2DConditionModel arguments")] = \
        field(default_factory=_default_unet)
    prediction_type: Literal["v_prediction", "epsilon", "sample"] = "v_prediction"  # v_prediction | epsilon | sample
    num_train_timesteps: PositiveInt = 1000  # DDPM's discrete schedule length
    # diffusers beta schedule (DDPM: linear 1e-4..0.02)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"] = "linear"
    beta_start: Annotated[float, Interval(gt=0, lt=1)] = 0.0001  # beta of the first timestep
    beta_end: Annotated[float, Interval(gt=0, lt=1)] = 0.02  # beta of the last timestep
    label_dropout: Probability = 0.1  # probability of the null label, for classifier-free guidance
    num_classes: Optional[Count] = None  # None: the data's class count (0 = unconditional)
    # Text-to-image teacher (methods/dsm_text.py): CLIPTextConfig overrides of a text encoder trained with a
    # UNet2DConditionModel (dsm.unet then holds its arguments); captions from the data's class phrasings;
    # label_dropout drops the caption to "". Empty: class-conditional UNet2DModel as above.
    text_encoder: Annotated[dict, Keys(_clip_text_keys, "transformers CLIPTextConfig arguments")] = \
        field(default_factory=dict)
    train_text_encoder: bool = True  # train the text encoder with the UNet (false: frozen at its random init)
    text_max_length: PositiveInt = 24  # tokens per prompt (with start / end), the encoder's positions
    # probability that a caption gets 1..caption_noise_tokens random vocabulary tokens inserted at random
    # places (robustness to words that carry no meaning for the image; text teachers only)
    caption_noise: Probability = 0.0
    caption_noise_tokens: PositiveInt = 2


class DSM(Method):
    """Train a teacher from data with DDPM's denoising loss (see module docstring)."""

    name = "dsm"
    Config = DSMConfig

    def __init__(self, student: Student, config: DSMConfig, optim=None, total_steps: int = 1000,
                 meta: Optional[dict] = None) -> None:
        super().__init__(None, student, config, optim, total_steps)
        self.meta = meta or {}

    @classmethod
    def from_config(cls, cfg, optim, device):
        """Build a fresh UNet whose resolution, channels and classes follow the data (unless set)."""
        from diffusers import DDPMScheduler, UNet2DModel

        from ..data import build_dataset
        from ..teachers import VPUNetDenoiser

        c: DSMConfig = cfg.method_config
        if c.prediction_type not in ("v_prediction", "epsilon", "sample"):
            raise UserError(f"dsm.prediction_type must be v_prediction, epsilon or sample, got {c.prediction_type!r}")
        data = build_dataset(cfg.data)
        num_classes = c.num_classes if c.num_classes is not None else int(getattr(data, "num_classes", 0) or 0)
        channels = cfg.data.channels or int(data.channels)
        kwargs = dict(c.unet)
        kwargs.update(sample_size=cfg.data.resolution, in_channels=channels, out_channels=channels)
        if num_classes:
            kwargs["num_class_embeds"] = num_classes + 1  # the last embedding is the null label
        try:
            unet = UNet2DModel(**kwargs)
        except (TypeError, ValueError) as e:
            raise UserError(f"dsm.unet is not a valid UNet2DModel config: {e}") from None
        scheduler = DDPMScheduler(num_train_timesteps=c.num_train_timesteps, beta_schedule=c.beta_schedule,
                                  beta_start=c.beta_start, beta_end=c.beta_end, prediction_type=c.prediction_type)
        net = VPUNetDenoiser(unet, scheduler.config, num_classes=num_classes or None).to(device)
        student = Student(net, [net.sigma_max])
        meta = {"num_classes": num_classes or None, "sigma_data": 0.5, "data": cfg.data.name,
                "resolution": cfg.data.resolution, "channels": channels, "trained_by": "diffdistill teacher train"}
        return cls(student, c, optim, cfg.train.steps, meta), None

    def train_step(self, batch: Batch, step: int) -> StepOutput:
        c: DSMConfig = self.config
        net = self.student.net
        x0 = batch.images
        b = x0.shape[0]
        t = batch.randint(len(net.sigmas), (b,))
        sigma = net.sigmas[t.to(net.sigmas.device)].to(x0.device)
        noise = batch.randn(x0.shape, device=x0.device)
        cond = batch.cond
        if cond is not None and net.num_classes and c.label_dropout > 0:
            drop = batch.rand((b,), device=x0.device) < c.label_dropout
            cond = torch.where(drop, torch.full_like(cond, net.num_classes), cond)
        x0_hat = self.wrapped["student"](x0 + sigma.view(-1, *[1] * (x0.ndim - 1)) * noise, sigma, cond)
        weight = {"v_prediction": (1 + sigma**2) / sigma**2, "epsilon": 1 / sigma**2,
                  "sample": torch.ones_like(sigma)}[c.prediction_type]
        per_sample = ((x0_hat - x0) ** 2).flatten(1).mean(1)
        loss = (weight * per_sample).mean()
        return StepOutput({"student": loss}, {"loss": float(loss.detach())})

    def generator(self):
        """A teacher is sampled with an ODE solver: return the live denoiser itself (the loop swaps the
        EMA weights in while it samples)."""
        return self.student.net

    def save_artifacts(self, run_dir) -> None:
        """Export the network as a diffusers folder at ``RUN/teacher`` (what ``teacher.path`` loads); the loop
        calls this inside ``Stepper.ema_weights()``, so it holds the EMA weights when EMA is on."""
        from diffusers import DDPMScheduler

        from ..teachers import save_teacher_folder

        net = self.student.net
        save_teacher_folder(net.unet, DDPMScheduler.from_config(net.scheduler_config), Path(run_dir) / "teacher", self.meta)


METHOD = DSM
