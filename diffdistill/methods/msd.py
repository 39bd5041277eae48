"""MSD — Multi-Student Distillation (Song et al., ICML 2025) [paper; no public code: a reconstruction].

The class labels are split into K disjoint groups (:mod:`diffdistill.partitions`: consecutive blocks by
default, the paper's best; k-means on the teacher's class embeddings; random). Student ``k`` is a one-step
(or few-step) generator distilled with DMD2 on group ``k`` only, with its own fake score and GAN head:

- its generator labels are drawn uniformly from its group (:class:`~.dmd2.DMD2` ``generator_classes``);
- its GAN head sees only the real images of the batch whose label is in its group ("real images for the
  GAN filtered to the group" [paper]);
- everything else is DMD2's maths unchanged: each student is a :class:`~.dmd2.DMD2` instance that MSD
  feeds its share of the batch (composition through DMD2's public ``train_step``, no private calls).

At sampling, :class:`~diffdistill.students.RoutedStudent` sends each label to its group's student: one
network evaluation per sample, as for one student. :meth:`MSD.generator` returns it, so every checkpoint's
artefact holds the K members and the router, and ``load_generator`` / ``sample`` / ``eval fid`` /
``export`` use it like any student.

Smaller students (``student.kind: small``) start with *Teacher Score Matching* [paper] for
``msd.tsm_steps`` iterations, on noised real images of their group::

    s ~ U(teacher grid);  x_s = x + s n;  L_TSM = mean(lambda(s) ||D_small(x_s, s, c) - D_teacher(x_s, s, c)||^2)

with ``lambda = 1/s^2 + 1/sd^2`` (``tsm_weighting: edm``, the default: the top level ``sigma_max``, where a
one-step student is evaluated, keeps weight ``1/sd^2``; eps-MSE ``1/s^2`` gives it ~0), then
DM (distribution matching), then the GAN terms from ``gan_start_step``: three stages of one run,
``status()["msd_stage"]`` = 0 (TSM), 1 (DM), 2 (DM + GAN). TSM trains a copy of each student, network
``tsm_k`` with its own optimizer and learning rate (``msd.tsm_lr``: training a network from scratch wants
a diffusion-training lr, 10-20x DM's), copied into ``student_k`` when DM starts, as if the stages were
separate runs; the fake scores do not train during TSM, and the generator (artefact, sample grids) is the
routed TSM networks until then.

How K students share one run's iterations: every iteration trains *every* student on its own slice of
the global batch (sample ``g`` of the global batch goes to student ``g mod K``: ``B/K`` generated samples
each). This is the paper's comparison ("4 students at batch 32 each beat 1 student at batch 128") and it
makes "equal total generator updates" exact: the routed generator (the union of the members' weights) takes
one update per generator turn on the whole batch of ``B`` samples, each sample's gradient reaching only its
member, so K = 1, 2, 5 runs at the same ``train.steps`` and ``train.batch_size`` make the same number of
generator updates, see the same number of samples and cost the same network evaluations. Round-robin (one
student per iteration on the whole batch) would give each member 1/K of the updates at a K times larger
batch, a different trade that the paper does not use. Interleaving (``g mod K``) rather than blocks keeps
every student in every process and micro-batch, which DDP needs (each rank must run each trained network's
forward); hence a micro-batch must hold at least K samples.

Several processes: each process trains every student on its share of the batch (data parallel, as DMD2).
One group per process was not chosen: the method-agnostic Stepper DDP-wraps every trained network over all
processes, and a DDP network must take part in every rank's backward; it would need one process group per
student, i.e. a change to the loop. Memory grows by K (students, fake scores, GAN heads). Two processes
reproduce one (1e-6, tested with the GAN off); the GAN's real term is a mean over each process's own real
images of the group, whose number varies, so with the GAN on they weight real images slightly differently.

EMA (``train.ema_decay``): one EMA over every member's weights (``ema_networks`` = ``student_0 ...``), as the
digits DMD2 recipe uses for sampling; DMD2's official code keeps none. With TSM the members do not step
until DM starts, so the EMA's first update (diffusers caps the decay at ``(1 + n) / (10 + n)``) all but
replaces the pre-TSM shadow: its weight is 0.1 after one update, 1e-5 after ten and 1e-7 after twenty.
Text prompts (``msd.partition: pca``, a text teacher and ``data.name: prompts``): the training prompts are
encoded once, their pooled embeddings split by :class:`~diffdistill.partitions.PCAPartition` into K balanced
groups, and student ``k`` draws its generator prompts uniformly from group ``k`` (its share ``B/K`` of the
batch, seeded by step and ``k``, so the draw does not depend on the number of processes). The routed
generator sends a new prompt down the same tree, and the artefact stores the tree as its router. Prompt files
carry no images, so the GAN branch (and TSM, which needs noised real images) is off for text students.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

import torch
from torch import Tensor

from ..denoiser import Denoiser, TextCond, append_dims, cond_to
from ..errors import UserError
from ..paths import atomic_file
from ..partitions import (PARTITION_KINDS, PCAPartition, check_partition, class_partition, format_partition,
                          pooled_text_embedding)
from ..schema import Count, PositiveFloat, PositiveInt
from ..seeding import mix_seed
from ..students import RoutedStudent, Student
from .base import Batch, Method, OptimConfig, StepOutput
from .dmd2 import DMD2, DMD2Config, fake_score_loss

PARTITION_FILE = "msd_partition.json"  # run-level record of the groups, written once by the main process
STAGES = ("tsm", "dm", "gan")


@dataclass
class MSDConfig(DMD2Config):
    """The ``msd:`` config section: every DMD2 key (applied to each student) plus the MSD keys below."""

    num_students: PositiveInt = 4  # K; the paper's ImageNet-64 result (FID 1.20) uses 4 same-size students
    # class labels: sequential (paper's best) | kmeans (teacher class embeddings) | random;
    # text prompts: pca (balanced cuts of pooled prompt embeddings along principal components)
    partition: Literal["sequential", "kmeans", "random", "pca"] = "sequential"
    partition_seed: Count = 0  # seed of the kmeans initialisation and of the random partition
    tsm_steps: Count = 0  # Teacher Score Matching iterations before DM (small students: the paper's first stage)
    # TSM's lambda(s) [paper: unstated]: 'edm' 1/s^2 + 1/sd^2 keeps the top levels, where a one-step student is
    # evaluated, in the loss; 'eps' 1/s^2 (eps-MSE) gives sigma_max = 157 a weight of 4e-5
    tsm_weighting: Literal["edm", "eps"] = "edm"
    tsm_lr: Optional[PositiveFloat] = None  # lr of the TSM stage (None: the generator's lr)


class _StudentDMD2(DMD2):
    """DMD2 for one MSD student: unchanged maths, errors named after the ``msd:`` section."""

    name = "msd"


class MSD(Method):
    """Multi-student distillation over a partition of the class labels (see the module docstring).

    Args:
        teacher: the unguided class-conditional (or text-conditional) teacher denoiser.
        students: K students (one per group), all at the same levels.
        groups: K disjoint groups of class labels covering every class (:mod:`diffdistill.partitions`), or a
            fitted :class:`~diffdistill.partitions.PCAPartition` of the training prompts (text teachers).
        config: :class:`MSDConfig`.
        optim: optimizer settings; ``config.lr`` / ``config.lr_fake`` override the learning rates.
        total_steps: the run's ``train.steps``.
        fake_scores: the K initial fake scores (default: copies of ``teacher``, as DMD2).
        prompt_groups: text only: ``prompt_groups[k]`` are the training prompts the partition gives student ``k``.
        encode: text only: prompts -> :class:`~diffdistill.denoiser.TextCond` (the teacher's text encoder).
    """

    name = "msd"
    Config = MSDConfig
    supports_fp16 = False
    fp16_reason = "DMD2, which each student runs, diverges in fp16"

    def __init__(self, teacher: Denoiser, students: Sequence[Student],
                 groups: "Sequence[Sequence[int]] | PCAPartition", config: MSDConfig,
                 optim: Optional[OptimConfig] = None, total_steps: int = 1000,
                 fake_scores: Optional[Sequence[Denoiser]] = None,
                 prompt_groups: Optional[Sequence[Sequence[str]]] = None,
                 encode: Optional[Callable[[list[str]], TextCond]] = None) -> None:
        optim = optim or OptimConfig()
        _validate(config, teacher, students, groups, optim, prompt_groups, encode)
        base_optim = optim
        if config.lr is not None:
            optim = dataclasses.replace(optim, lr=config.lr)
        super().__init__(teacher, RoutedStudent(list(students), groups), config, optim, total_steps)
        self._unregister("student")  # Method registers student.net (member 0); MSD names members student_k
        self.ema_networks = tuple(f"student_{k}" for k in range(len(students)))  # one EMA over every member
        self.partition = [list(g) for g in self.student.groups]  # label groups ([] for text)
        self.text_partition: Optional[PCAPartition] = self.student.text_partition
        self.prompt_groups = [list(g) for g in prompt_groups] if prompt_groups is not None else None
        self.encode = encode
        dmd_config = DMD2Config(**{f.name: getattr(config, f.name) for f in dataclasses.fields(DMD2Config)})
        self.members: list[DMD2] = []
        for k, student in enumerate(students):
            fake = fake_scores[k] if fake_scores is not None else None
            sub = _StudentDMD2(teacher, student, dmd_config, base_optim, total_steps, fake_score=fake,
                               generator_classes=self.partition[k] if self.partition else None)
            for name, net in sub.nets.items():  # student -> student_k, fake_score -> fake_score_k, ...
                spec = sub.optim_specs.get(name)
                group_name = next((g for g, members in sub.groups.items() if name in members), name)
                self.add_network(f"{name}_{k}", net, lr=(spec.lr if spec and spec.lr is not None else sub.optim.lr),
                                 betas=spec.betas if spec else None, optimizer=spec.optimizer if spec else "adamw",
                                 group=f"{group_name}_{k}")
            self.members.append(sub)
        self.grid = self.members[0].grid  # the teacher's noise levels (TSM draws from them, as the fake-score loss)
        self.tsm_student: Optional[RoutedStudent] = None
        if config.tsm_steps > 0:  # TSM's own copies of the students (own optimizer and lr), see the module docstring
            copies = [Student(copy.deepcopy(m.net), m.levels, m.renoise) for m in self.student.members]
            self.tsm_student = RoutedStudent(copies, self.partition)
            for k, m in enumerate(copies):
                self.add_network(f"tsm_{k}", m.net, lr=config.tsm_lr if config.tsm_lr is not None else self.optim.lr)
        self._next_step = 0

    @property
    def num_students(self) -> int:
        return len(self.members)

    def _unregister(self, name: str) -> None:
        for store in (self.nets, self.wrapped, self.optim_specs):
            store.pop(name, None)
        self.groups = {g: [m for m in ms if m != name] for g, ms in self.groups.items()}
        self.groups = {g: ms for g, ms in self.groups.items() if ms}

    # ----------------------------------------------------------------------------------------------
    # Stages
    def stage(self, step: int) -> str:
        """``"tsm"`` before ``tsm_steps``, then ``"dm"``, then ``"gan"`` from DMD2's ``gan_start_step``."""
        cfg = self.config
        if step < cfg.tsm_steps:
            return "tsm"
        return "gan" if cfg.gan and step >= cfg.gan_start_step else "dm"

    # ----------------------------------------------------------------------------------------------
    # Each student's share of the batch
    def student_batch(self, batch: Batch, k: int) -> Batch:
        """Student ``k``'s part of ``batch``: its generator samples and the real images of its group.

        Generated samples: global sample ``g`` goes to student ``g mod K``; this micro-batch's samples of
        student ``k`` are a contiguous slice ``[offset_k, offset_k + size_k)`` of that student's
        ``global_size_k`` samples, so the student's noise, drawn for its global share and sliced
        (:class:`Batch`), does not depend on the number of processes or micro-batches. Its generator is
        seeded from the step's seed and ``k``. Real images (and their labels, the batch's ``cond``): those
        of the micro-batch whose label is in group ``k`` (their number varies; it may be zero). Text: the
        ``cond`` is ``size_k`` prompts drawn uniformly from group ``k`` (the same global-draw-then-slice rule),
        encoded by the teacher's text encoder; there are no real images.
        """
        kk = self.num_students

        def count(n: int) -> int:  # global indices g < n with g mod K == k
            return max(0, (n - k + kk - 1) // kk)

        offset_k = count(batch.offset)
        size_k = count(batch.offset + batch.size) - offset_k
        if size_k < 1:
            raise UserError(f"msd needs at least msd.num_students={kk} samples per process and micro-batch, got "
                            f"{batch.size}: raise train.batch_size or lower train.grad_accum")
        gen = torch.Generator(device=batch.generator.device).manual_seed(mix_seed(batch.generator.initial_seed(), k))
        images, cond = batch.images, batch.cond
        if self.text_partition is not None:
            pool = self.prompt_groups[k]
            cpu = torch.Generator().manual_seed(mix_seed(batch.generator.initial_seed(), k, 3))
            idx = torch.randint(len(pool), (count(batch.global_size),), generator=cpu)[offset_k:offset_k + size_k]
            cond = cond_to(self.encode([pool[int(i)] for i in idx]), self.device)
            return Batch(None, cond, gen, size_k, offset_k, count(batch.global_size))
        if isinstance(cond, Tensor):
            mask = torch.isin(cond, torch.as_tensor(self.partition[k], device=cond.device))
            cond = cond[mask]
            images = images[mask.to(images.device)] if images is not None else None
        return Batch(images, cond, gen, size_k, offset_k, count(batch.global_size))

    # ----------------------------------------------------------------------------------------------
    # The step
    def train_step(self, batch: Batch, step: int) -> StepOutput:
        stage = self.stage(step)
        losses: dict[str, Tensor] = {}
        logs: dict[str, float] = {}
        sums: dict[str, list[float]] = {}
        for k, sub in enumerate(self.members):
            for name in sub.nets:  # the Stepper's (DDP-wrapped) modules for the losses that train them
                sub.wrapped[name] = self.wrapped[f"{name}_{k}"]
            sub.accelerator = self.accelerator
            part = self.student_batch(batch, k)
            if stage == "tsm":
                losses[f"tsm_{k}"], parts = self.tsm_loss(k, part)
            else:
                if step == self.config.tsm_steps > 0:  # DM starts from the TSM network (every micro-batch: idempotent)
                    self._copy_tsm_into_student(k)
                out = sub.train_step(part, step)
                losses.update({f"{g}_{k}": v for g, v in out.losses.items()})
                parts = out.logs
            for key, v in parts.items():
                sums.setdefault(key, []).append(v)
            for key in ("loss_dm", "loss_fake", "loss_tsm"):
                if key in parts:
                    logs[f"student_{k}/{key}"] = parts[key]  # per student (TensorBoard groups by prefix)
        logs.update({key: sum(v) / len(v) for key, v in sums.items()})  # the mean over students
        return StepOutput(losses, logs)

    def tsm_loss(self, k: int, part: Batch) -> tuple[Tensor, dict[str, float]]:
        """Teacher Score Matching of student ``k`` on the noised real images of its group (module docstring).

        ``s`` uniform over the teacher's grid (as the fake-score loss), ``n ~ N(0, I)``; the teacher is
        evaluated unguided, without gradient. A micro-batch without an image of the group gives a zero loss
        through one evaluation, so that under DDP every rank still runs the student's forward.
        """
        cfg = self.config
        net = self.wrapped[f"tsm_{k}"]
        student = self.members[k].student
        if part.images is None:
            raise UserError("msd.tsm_steps > 0 needs real images (Teacher Score Matching runs on noised data)")
        x = part.images.to(self.device, torch.float32)
        if len(x) == 0:
            z = torch.zeros(1, *self.teacher.sample_shape, device=self.device)
            label = torch.as_tensor(self.partition[k][:1], device=self.device)
            return 0.0 * net(z, student.levels[0], label).sum(), {}
        idx = (part.rand((len(x),)).cpu() * len(self.grid)).long().clamp(max=len(self.grid) - 1)
        s = self.grid[idx].to(self.device)
        x_s = x + append_dims(s, x.ndim) * part.randn(x.shape).to(self.device)
        with torch.no_grad():
            target = self.teacher(x_s, s, part.cond).float()
        loss = fake_score_loss(net(x_s, s, part.cond), target, s, self.teacher.sigma_data, cfg.tsm_weighting)
        return loss, {"loss_tsm": float(loss.detach())}

    @torch.no_grad()
    def _copy_tsm_into_student(self, k: int) -> None:
        for dst, src in zip(self.nets[f"student_{k}"].parameters(), self.nets[f"tsm_{k}"].parameters()):
            dst.copy_(src)
        for dst, src in zip(self.nets[f"student_{k}"].buffers(), self.nets[f"tsm_{k}"].buffers()):
            dst.copy_(src)

    def generator(self) -> RoutedStudent:
        """The routed students (the TSM networks while the TSM stage lasts)."""
        if self.tsm_student is not None and self.stage(self._next_step) == "tsm":
            return self.tsm_student
        return self.student

    # ----------------------------------------------------------------------------------------------
    # Hooks: the partition is saved with the run and printed; the stage is reported
    def on_train_start(self, run_dir: Path, step: int, is_main: bool) -> None:
        self._next_step = step
        path = Path(run_dir) / PARTITION_FILE
        record = self.partition_record()
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("groups") != record["groups"]:
                raise UserError(f"{path} records groups {saved.get('groups')} but this config gives "
                                f"{record['groups']}: resume with the run's own msd settings")
        elif is_main:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            # atomic: the other ranks read this file in this same hook and must never see it half-written
            atomic_file(path, lambda tmp: tmp.write_text(json.dumps(record, indent=2)))
        if is_main:
            print(f"msd: {self.num_students} students, partition {self.config.partition!r} "
                  f"(saved in {path}):\n{self.describe_partition()}", flush=True)

    def describe_partition(self) -> str:
        """The printed table: each student's classes, or its number of prompts and a few of them."""
        if self.text_partition is None:
            return format_partition(self.partition)
        lines = ["student | prompts", "---|---"]
        for k, g in enumerate(self.prompt_groups):
            shown = "; ".join(repr(p) for p in g[:3]) + ("; ..." if len(g) > 3 else "")
            lines.append(f"{k} | {len(g)}: {shown}")
        return "\n".join(lines)

    def partition_record(self) -> dict[str, Any]:
        """What ``msd_partition.json`` holds: the kind, seed and groups, and each label's student (text: the
        PCA tree that routes prompts and each student's training prompts)."""
        if self.text_partition is not None:
            return {**self.text_partition.to_json(), "partition": "pca", "groups": self.prompt_groups}
        member_of = {c: k for k, g in enumerate(self.partition) for c in g}
        return {"type": "classes", "partition": self.config.partition, "seed": self.config.partition_seed,
                "num_students": self.num_students, "groups": self.partition,
                "student_of_label": [member_of[c] for c in sorted(member_of)]}

    def on_step_end(self, step: int) -> dict[str, float]:
        self._next_step = step
        return {}

    def status(self) -> dict[str, float]:
        return {"msd_stage": float(STAGES.index(self.stage(self._next_step)))}

    def extra_state(self) -> dict[str, Any]:
        return {"partition": self.partition if self.text_partition is None else self.prompt_groups}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        saved = state.get("partition")
        if saved is not None and saved != self.extra_state()["partition"]:
            raise UserError(f"the checkpoint was trained with groups {saved}, this config gives {self.partition}: "
                            "resume with the run's own msd settings")

    # ----------------------------------------------------------------------------------------------
    # Construction from a config
    @classmethod
    def from_config(cls, cfg: Any, optim: OptimConfig, device: Any) -> tuple["MSD", Any]:
        """Load the teacher, partition its classes and build K students of ``student.kind``."""
        from ..schedules import timestep_levels
        from ..students import build_student_net
        from ..training.build import load_teacher_for

        c: MSDConfig = cfg.method_config
        if c.num_students < 1:
            raise UserError(f"msd.num_students must be >= 1, got {c.num_students}")
        micro = cfg.train.batch_size // max(cfg.train.grad_accum, 1)
        if micro < c.num_students:
            raise UserError(f"msd needs at least msd.num_students={c.num_students} samples per micro-batch, got "
                            f"train.batch_size={cfg.train.batch_size} / train.grad_accum={cfg.train.grad_accum}")
        teacher = load_teacher_for(cfg, device)
        den = teacher.denoiser
        text: dict[str, Any] = {}
        if getattr(den, "is_text", False):
            groups, text = text_partition(cfg, teacher, c.num_students)
        elif c.partition == "pca" or cfg.data.name == "prompts":
            raise UserError("msd.partition=pca and data.name=prompts are for text teachers; this teacher takes "
                            "class labels: use sequential, kmeans or random")
        elif not den.num_classes:
            raise UserError("msd partitions class labels, but the teacher is not class-conditional")
        else:
            embeddings = class_embedding_table(den) if c.partition == "kmeans" else None
            groups = class_partition(den.num_classes, c.num_students, c.partition, c.partition_seed, embeddings)
        if cfg.student.steps < 1:
            raise UserError(f"student.steps must be >= 1, got {cfg.student.steps}")
        levels = cfg.student.levels or timestep_levels(den.sigma_grid(), cfg.student.steps)
        students = []
        for _ in range(c.num_students):
            try:
                net = build_student_net(den, cfg.student.kind, cfg.student.lora_rank, small=cfg.student.small)
            except (ValueError, TypeError) as e:
                raise UserError(f"cannot build the {cfg.student.kind!r} student: {e}") from None
            students.append(Student(net.to(device=device, dtype=torch.float32), levels, cfg.student.renoise))
        return cls(den, students, groups, c, optim, cfg.train.steps, **text), teacher


def text_partition(cfg: Any, teacher: Any, k: int) -> tuple[PCAPartition, dict[str, Any]]:
    """Encode the run's prompt file once and split the pooled embeddings into ``k`` balanced PCA groups.

    Returns the partition and the MSD keyword arguments ``prompt_groups`` / ``encode``."""
    from ..data import training_prompts

    if cfg.method_config.partition != "pca":
        raise UserError(f"msd on a text teacher partitions prompts: set msd.partition=pca "
                        f"(got {cfg.method_config.partition!r}, a class-label partition)")
    if cfg.method_config.gan:
        raise UserError("msd on a text teacher trains without the GAN (its real images would have to be routed by "
                        "caption): set msd.gan=false")
    prompts = training_prompts(cfg.data)
    if not prompts:
        raise UserError("msd on a text teacher draws each student's prompts from the data: use data.name=prompts "
                        "(one prompt per line) or a captioned image folder (metadata.jsonl or .txt captions)")
    prompts = list(dict.fromkeys(prompts))  # each distinct prompt once: the partition splits prompts, not images
    if len(prompts) < k:
        raise UserError(f"msd.num_students={k} needs at least {k} distinct prompts, got {len(prompts)}")
    with torch.no_grad():
        pooled = torch.cat([pooled_text_embedding(teacher.encode_prompts(prompts[i:i + 64])).cpu()
                            for i in range(0, len(prompts), 64)])
    part = PCAPartition.fit(pooled, k)
    route = part.route(pooled)
    groups = [[p for p, r in zip(prompts, route.tolist()) if r == j] for j in range(k)]
    empty = [j for j, g in enumerate(groups) if not g]
    if empty:
        raise UserError(f"the prompt partition left student {empty[0]} without prompts ({len(prompts)} prompts, "
                        f"{len(set(prompts))} distinct, msd.num_students={k}): give more distinct prompts")
    return part, {"prompt_groups": groups, "encode": teacher.encode_prompts}


def class_embedding_table(denoiser: Denoiser) -> Tensor:
    """The teacher's class-embedding rows ``[num_classes, D]`` (a diffusers UNet's ``class_embedding``, or the
    first ``nn.Embedding`` with enough rows), for ``msd.partition: kmeans``."""
    n = denoiser.num_classes
    found = [m for name, m in denoiser.named_modules()
             if isinstance(m, torch.nn.Embedding) and m.num_embeddings >= n and name.endswith("class_embedding")]
    found = found or [m for m in denoiser.modules() if isinstance(m, torch.nn.Embedding) and m.num_embeddings >= n]
    if not found:
        raise UserError("msd.partition=kmeans needs the teacher's class-embedding table and this teacher has none; "
                        "use sequential or random")
    return found[0].weight.detach()[:n].float().cpu()


def _validate(cfg: MSDConfig, teacher: Denoiser, students: Sequence[Student],
              groups: "Sequence[Sequence[int]] | PCAPartition", optim: OptimConfig,
              prompt_groups: Optional[Sequence[Sequence[str]]], encode: Optional[Callable]) -> None:
    """Reject impossible settings with one clear line (DMD2's own keys are checked by each student's DMD2)."""
    if isinstance(groups, PCAPartition):
        if cfg.partition != "pca":
            raise UserError(f"a text partition needs msd.partition=pca, got {cfg.partition!r}")
        if prompt_groups is None or encode is None or len(prompt_groups) != len(students):
            raise UserError("msd on text needs each student's training prompts and the teacher's text encoder")
        if any(not g for g in prompt_groups):
            raise UserError("every msd student needs at least one prompt")
        n_groups = groups.num_students
    else:
        if cfg.partition not in PARTITION_KINDS:
            raise UserError(f"unknown msd.partition {cfg.partition!r}; choose {', '.join(PARTITION_KINDS)} "
                            "(pca: text teachers)")
        if not teacher.num_classes:
            raise UserError("msd partitions class labels, but the teacher is not class-conditional")
        n_groups = len(groups)
    if cfg.num_students != len(students) or len(students) != n_groups:
        raise UserError(f"msd.num_students={cfg.num_students} but got {len(students)} students and "
                        f"{n_groups} groups")
    if not isinstance(groups, PCAPartition):
        check_partition(groups, teacher.num_classes)
    if cfg.tsm_weighting not in ("edm", "eps"):
        raise UserError(f"msd.tsm_weighting must be 'edm' or 'eps', got {cfg.tsm_weighting!r}")
    if cfg.tsm_steps < 0:
        raise UserError(f"msd.tsm_steps must be >= 0, got {cfg.tsm_steps}")
    if cfg.generator_labels != "random":
        raise UserError("msd.generator_labels must be 'random': each student draws its generator labels from its group")


METHOD = MSD
