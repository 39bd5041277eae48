"""The public sampling API: ``load_generator(path).sample(...)`` for teachers and trained students.

Noise is seeded per sample (sample ``i`` of seed ``s`` always starts from the same ``z``), so results do
not depend on the batch size or on how samples are split across processes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from .denoiser import CFGDenoiser, Denoiser, module_device
from .errors import UserError
from .samplers import SAMPLERS
from .schedules import karras_sigmas
from .seeding import mix_seed

TEACHER_DEFAULT_STEPS = 40


class Generator:
    """Samples images (in [-1, 1]) from a student or a teacher.

    Args:
        model: a :class:`~diffdistill.students.Student` or :class:`~diffdistill.students.RoutedStudent`
            (sampled in its own few steps) or a :class:`Denoiser` (teacher, integrated with ``sampler``
            over a Karras grid).
        decode: latents -> images for latent models (identity when ``None``).
        encode_prompts: prompts -> text condition, for text-conditional models.
        guidance_scale: classifier-free guidance for teachers (students have it distilled in).
        sampler: ``heun`` (EDM, NFE = 2 steps - 1), ``euler`` or ``ddim`` (NFE = steps) for teachers.
    """

    def __init__(self, model: Any, decode: Optional[Callable[[Tensor], Tensor]] = None,
                 encode_prompts: Optional[Callable[[list[str]], Any]] = None, guidance_scale: float = 1.0,
                 sampler: str = "heun") -> None:
        self.model = model
        self.is_teacher = isinstance(model, Denoiser)
        self.denoiser: Denoiser = model if self.is_teacher else model.net
        self.decode = decode
        self.encode_prompts = encode_prompts
        self.guidance_scale = guidance_scale
        if sampler not in SAMPLERS:
            raise UserError(f"unknown sampler {sampler!r}; choose {', '.join(SAMPLERS)}")
        self.sampler = sampler
        self.num_classes: Optional[int] = self.denoiser.num_classes
        self.default_steps = TEACHER_DEFAULT_STEPS if self.is_teacher else model.steps
        self.artefact: Optional[Path] = None  # the student artefact folder this was loaded from, if any
        self.note: Optional[str] = None  # why that one (load_generator's ``steps``: a stage student)

    # ---------------------------------------------------------------------------------------------
    @classmethod
    def from_teacher(cls, teacher: Any, guidance_scale: float = 1.0, sampler: str = "heun") -> "Generator":
        """From a :class:`~diffdistill.teachers.Teacher` bundle."""
        return cls(teacher.denoiser, _decoder(teacher), _prompt_encoder(teacher), guidance_scale, sampler)

    @classmethod
    def from_method(cls, method: Any, teacher: Optional[Any] = None, guidance_scale: float = 1.0) -> "Generator":
        """From a (trained) method: its ``generator()`` (a student, or a denoiser for teacher training)."""
        return cls(method.generator(), _decoder(teacher), _prompt_encoder(teacher), guidance_scale)

    @property
    def device(self) -> torch.device:
        return module_device(self.denoiser)

    @property
    def image_like(self) -> bool:
        return len(self.denoiser.sample_shape) == 3

    def nfe(self, steps: Optional[int] = None) -> int:
        """Network evaluations per sample for ``steps`` (CFG's two branches count as one batched call)."""
        steps = steps or self.default_steps
        if self.is_teacher:
            return 2 * steps - 1 if self.sampler == "heun" else steps
        return len(self.model.levels_for(steps))

    def labels_for(self, num_samples: int, labels: Optional[Sequence[int]] = None, offset: int = 0) -> Optional[Tensor]:
        """Class labels for samples ``offset .. offset + num_samples``: ``labels`` repeated cyclically,
        or ``i mod num_classes`` (class-balanced). An unknown label is a :class:`UserError`."""
        if not self.num_classes:
            if labels:
                raise UserError("this model is not class-conditional: --labels cannot be used")
            return None
        idx = torch.arange(offset, offset + num_samples)
        if not labels:
            return idx % self.num_classes
        bad = [int(v) for v in labels if not 0 <= int(v) < self.num_classes]
        if bad:
            raise UserError(f"unknown class label {bad[0]}: this model has classes 0..{self.num_classes - 1}")
        lab = torch.as_tensor([int(v) for v in labels])
        return lab[idx % len(lab)]

    @torch.no_grad()
    def sample(self, num_samples: int, steps: Optional[int] = None, labels: Optional[Sequence[int]] = None,
               prompts: Optional[Sequence[str]] = None, seed: Optional[int] = None,
               batch_size: Optional[int] = None, offset: int = 0, progress: bool = False) -> Tensor:
        """``num_samples`` images ``[N, C, H, W]`` in [-1, 1] (on the CPU).

        ``labels`` / ``prompts`` repeat cyclically; ``offset`` is the global index of the first sample
        (for splitting one seeded set across processes).
        """
        from tqdm.auto import tqdm

        steps = self.default_steps if steps is None else steps  # 0 is a mistake, not "the default"
        if steps < 1:
            raise UserError(f"--steps must be >= 1, got {steps}")
        if batch_size is not None and batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {batch_size}")
        seed = 0 if seed is None else int(seed)
        batch_size = batch_size or 256
        all_labels = self.labels_for(num_samples, labels, offset)
        if prompts is not None and self.encode_prompts is None:
            raise UserError("this model takes no text prompts")
        out = []
        for start in tqdm(range(0, num_samples, batch_size), disable=not progress, desc="sampling"):
            n = min(batch_size, num_samples - start)
            z = torch.stack([torch.randn(self.denoiser.sample_shape, generator=torch.Generator().manual_seed(
                mix_seed(seed, offset + start + i))) for i in range(n)]).to(self.device)
            cond = None
            if all_labels is not None:
                cond = all_labels[start:start + n].to(self.device)
            if prompts is not None:
                cond = self.encode_prompts([prompts[(offset + start + i) % len(prompts)] for i in range(n)])
            gen = torch.Generator(device=self.device).manual_seed(mix_seed(seed, offset + start, 7))
            try:
                x = self._generate(z, cond, steps, gen)
            except ValueError as e:  # e.g. a routed student asked for a label no member serves
                raise UserError(str(e)) from None
            if self.decode is not None:
                x = self.decode(x)
            out.append(x.float().clamp(-1, 1).cpu())
        return torch.cat(out) if out else torch.empty(0, *self.denoiser.sample_shape)

    def _generate(self, z: Tensor, cond: Any, steps: int, gen: torch.Generator) -> Tensor:
        if not self.is_teacher:
            return self.model(z, cond, steps=steps, generator=gen)
        den = self.denoiser
        if self.guidance_scale != 1.0 and cond is not None:
            den = CFGDenoiser(den, self.guidance_scale)
        sigmas = karras_sigmas(steps, den.sigma_min, den.sigma_max)
        return SAMPLERS[self.sampler](den, z * sigmas[0], sigmas, cond, gen).x


def _decoder(teacher: Any) -> Optional[Callable[[Tensor], Tensor]]:
    if teacher is None or getattr(teacher, "vae", None) is None:
        return None
    return teacher.decode


def _prompt_encoder(teacher: Any) -> Optional[Callable[[list[str]], Any]]:
    if teacher is None or getattr(teacher, "text_encoders", None) is None:
        return None
    return teacher.encode_prompts


def load_generator(path: str | Path, device: Optional[str] = None, guidance_scale: Optional[float] = None,
                   sampler: str = "heun", steps: Optional[int] = None) -> Generator:
    """A generator from a run folder (latest checkpoint), a checkpoint folder, a student artefact folder,
    a folder written by ``diffdistill export``, or a teacher folder.

    Students are built from their self-describing artefact alone (:mod:`diffdistill.artefact`): no
    training method, fake score, GAN head or optimizer state. An exported student is sampled in its own
    recorded levels; a teacher with ``sampler`` (its ``guidance_scale``, default 1).

    ``steps``: the step count you will sample at. A run (or checkpoint) that kept one student per stage
    (TSCD: ``RUN/stages/steps-K``) then gives the stage student trained for that many segments, and one
    line says which (also in ``Generator.note``; ``Generator.artefact`` is the folder loaded).
    """
    from .artefact import load_artefact, select_artefact
    from .checkpoint_io import latest_checkpoint
    from .paths import resolve_path

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    p = Path(resolve_path(str(path)))
    folder, note = select_artefact(p, steps)
    if note and int(os.environ.get("RANK", "0")) == 0:
        print(note)
    if folder is not None:
        art = load_artefact(folder, device)
        w = art.spec.get("guidance_scale", 1.0) if guidance_scale is None else guidance_scale
        gen = Generator(art.model, _decoder(art.components), _prompt_encoder(art.components), w, sampler)
        gen.artefact, gen.note = folder, note
        return gen
    if (p / "meta.json").is_file() or latest_checkpoint(p) is not None:
        raise UserError(f"{p} holds a checkpoint without a student artefact (student/student.json): it was written "
                        "by an older diffdistill; resume the run for one more checkpoint to write one")
    from .checkpoint_io import incomplete_checkpoint

    why = incomplete_checkpoint(p)  # a damaged checkpoint, not a teacher folder without unet/config.json
    if why is not None:
        raise UserError(why)
    from .teachers import load_teacher

    teacher = load_teacher(str(p), device=device)
    student = exported_student(teacher)
    if student is not None:
        return Generator(student, _decoder(teacher), _prompt_encoder(teacher), 1.0 if guidance_scale is None
                         else guidance_scale, sampler)
    return Generator.from_teacher(teacher, 1.0 if guidance_scale is None else guidance_scale, sampler)


def check_guidance_scale(gen: Generator, guidance_scale: Optional[float], prompts: bool = False) -> None:
    """``--guidance-scale`` is classifier-free guidance of a *teacher*'s ODE: refuse it (one line) for a
    student, whose guidance was distilled in, for a negative scale, and when the samples have no condition
    to guide towards (an unconditional teacher, or a text teacher without ``--prompts``)."""
    if guidance_scale is None:
        return
    if guidance_scale < 0:
        raise UserError(f"--guidance-scale must be >= 0, got {guidance_scale}")
    if not gen.is_teacher:
        raise UserError("--guidance-scale applies to teachers: a student's guidance was distilled in at training "
                        "(teacher.guidance_scale of its run)")
    if guidance_scale != 1.0 and gen.encode_prompts is not None and not prompts:
        raise UserError("--guidance-scale on a text teacher needs --prompts (guidance pulls towards a prompt)")
    if guidance_scale != 1.0 and gen.encode_prompts is None and not gen.denoiser.num_classes:
        raise UserError("--guidance-scale needs a conditional teacher: this one is unconditional")


def apply_gamma(gen: Generator, gamma: Optional[float]) -> None:
    """``--gamma``: sample a deterministic (DDIM) multi-step student with TCD's strategic stochastic sampling
    (:class:`~diffdistill.students.Student`; diffusers' ``TCDScheduler`` ``eta``). Refused, one line, outside
    [0, 1], for a teacher (its ODE solver is ``--sampler``) and for a student that already re-noises with fresh
    noise at every step (DMD2, CD, iCT): there gamma would change nothing."""
    if gamma is None:
        return
    from .students import RoutedStudent, Student

    if not 0.0 <= gamma <= 1.0:
        raise UserError(f"--gamma must be in [0, 1] (0: DDIM, 1: fresh noise at every step), got {gamma}")
    if gen.is_teacher:
        raise UserError("--gamma applies to students that step deterministically (renoise ddim, e.g. TSCD); a "
                        "teacher is sampled by its ODE solver (--sampler)")
    members = list(gen.model.members) if isinstance(gen.model, RoutedStudent) else [gen.model]
    if any(type(m) is not Student or m.renoise != "ddim" for m in members):
        raise UserError("--gamma applies to students that step deterministically (renoise ddim, e.g. TSCD); this "
                        "one re-noises with fresh noise at every step already")
    for m in members:
        m.gamma = float(gamma)


def exported_student(teacher: Any) -> Optional[Any]:
    """The student recorded in an exported folder's ``diffdistill.json`` (``"student"``: levels, re-noising,
    wrapper) around the folder's network, or ``None`` for a plain teacher folder."""
    info = (teacher.meta or {}).get("student")
    if not info:
        return None
    from .artefact import wrap_member

    entry = {"levels": info["levels"], "renoise": info.get("renoise", "fresh"),
             "wrapper": info.get("wrapper") or {"type": "plain"}}
    return wrap_member(entry, teacher.denoiser)


def save_grid(images: Tensor, path: str | Path, nrow: Optional[int] = None) -> None:
    """Save images in [-1, 1] as one PNG grid (``nrow`` defaults to 10 for class-ordered samples)."""
    from torchvision.utils import save_image

    n = len(images)
    nrow = nrow or (10 if n >= 10 else n)
    save_image((images + 1) / 2, str(path), nrow=nrow, padding=1, pad_value=1.0)


def save_pngs(images: Tensor, out_dir: str | Path, start: int = 0) -> list[Path]:
    """Save each image as ``DIR/000000.png``, ... in sample order."""
    from torchvision.utils import save_image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        p = out / f"{start + i:06d}.png"
        save_image((img + 1) / 2, str(p))
        paths.append(p)
    return paths


__all__ = ["Generator", "apply_gamma", "load_generator", "save_grid", "save_pngs"]
