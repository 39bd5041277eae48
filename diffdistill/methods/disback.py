"""DisBack — Distribution Backtracking (Zhang et al., ICLR 2025), on top of DMD2.

Stage 1, *degradation recording* (iterations ``0 .. D-1``, ``D = disback.degradation_steps``): the student
as initialised, ``G0``, is frozen; the fake score (a copy of the teacher) is trained with DMD2's fake-score
loss on ``G0``'s samples only::

    x = sg(G0(z, c));  s ~ U(teacher grid);  L = mean(lambda(s) (D_fake(x + s n, s) - x)^2)

so it drifts from the teacher's score (``p_data``) to the score of ``G0``'s distribution. Its weights after
``s_k = k D // N`` updates, ``k = 0 .. N`` (``N = disback.num_nodes``), are the *nodes* of the degradation
path: node 0 is the teacher, node ``N`` the path's end (fitted to ``G0``). Stage 1 runs the fake score's
AdamW at ``disback.degradation_lr_scale`` x its lr: at the lr that lets a fake score track a moving
generator, the degradation happens in its first few dozen updates (measured on the toy and the digits), so
evenly spaced nodes would all sit at the path's end; a smaller lr spreads them along it.

Stage 2, *backtracking* (iterations ``D ..``): DMD2 exactly (generator and critic turns, two time-scale
rule, optional GAN; :class:`~diffdistill.methods.dmd2.DMD2`), except that the real score the generator
chases is the frozen node ``N-1`` for ``disback.interval`` iterations, then ``N-2``, ..., then node 0 = the
teacher itself for the rest of the run::

    grad = (D_fake(x_s) - D_node_k(x_s)) / mean|x - D_node_k(x_s)|,   k = N-1, N-2, ..., 0

The fake score simply continues from stage 1, i.e. it starts at the path's end, node ``N`` (the paper: "the
fake score starts from the last node"). The targets are nodes ``N-1 .. 0``, so the first target already
differs from the fake score: starting the walk at node ``N`` itself would make the first interval's
distribution-matching gradient ``D_fake - D_real`` exactly zero at its start. ``N + 1`` files are therefore
written for ``N`` targets (the SDXL release: 10 nodes every 100 iterations over 1000, plus the teacher).

Storage: ``RUN/disback_path/node-KK.safetensors`` (the fake score's state dict) and ``path.json`` (each
node's index, step, sha256 and size, the path's ``N`` / ``D``, and the student / fake-score shapes it was
recorded for), written once by the main process when each node is reached — not in every checkpoint.
``disback.path_from: RUN`` skips stage 1 and walks the path that run recorded (its node ``N`` initialises
the fake score). Loading a node is strict: a missing file, a sha256 that differs from ``path.json``, a
corrupt file, or missing / unexpected / reshaped keys is one :class:`~diffdistill.errors.UserError` line.

Node 0's weights equal the teacher's (it is recorded before the first update), and the walk's last target
is the teacher denoiser itself, so the run ends on exactly DMD2's objective; with a teacher that has no
weights (the exact toy mixture) node 0's file holds the initial fake score and the target is still the
exact teacher.

Why a subclass of DMD2: DisBack *is* DMD2 with another real score, so stage 2 calls ``DMD2.train_step`` and
changes only ``self.real_score``, an attribute that DMD2's generator turn reads at every call (documented
there as the extension point); stage 1 uses DMD2's public ``generator_input`` and ``critic_loss``. No
private method of DMD2 is called, and DMD2's numbers are untouched.

Multi-process: only the main process writes node files and ``path.json`` (atomically: temporary file,
fsync, rename), all during stage 1; every process reads a node only at a switch in stage 2, after a
barrier (``accelerator.wait_for_everyone``) that the main process reaches only once all its writes are
done, so no process can read a node that is still being written. The run folder must be visible to all
processes (a shared file system on several machines, as for ``--resume``).

Hook order (the loop, or a plain-Python driver): ``on_train_start(run_dir, step, is_main)`` once, then for
each step ``train_step`` (via the Stepper) and ``on_step_end(step + 1)``, which records nodes and switches
targets; ``status()`` reports ``disback_node`` (``N`` while recording, then ``N-1 .. 0``, the node the last
step used) and ``disback_stage``.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..checkpoint_io import load_safetensors
from ..denoiser import CFGDenoiser, Denoiser
from ..errors import UserError
from ..paths import atomic_file
from ..schema import Count, Fraction, PositiveInt
from ..students import Student
from .base import Batch, OptimConfig, StepOutput
from .dmd2 import DMD2, DMD2Config

PATH_DIR = "disback_path"
PATH_FILE = "path.json"
FORMAT = 1


@dataclass
class DisBackConfig(DMD2Config):
    """The ``disback:`` section: every ``dmd2:`` key (stage 2 is DMD2) plus the path's own."""

    num_nodes: PositiveInt = 10  # N: targets N-1 .. 0 (0 = the teacher); node N, the path's end, starts the fake score
    degradation_steps: Count = 1000  # D: stage-1 iterations; node k is the fake score after k*D//N of them
    interval: PositiveInt = 1000  # stage-2 iterations per target node before switching to the previous one
    # stage 1 runs the fake score's AdamW at this fraction of its lr, so that a fake score tuned to track a
    # moving generator (large lr) does not degrade in a handful of steps and crowd every node at the path's end
    degradation_lr_scale: Fraction = 1.0
    path_from: str = ""  # a run folder whose recorded path to walk (skips stage 1); "" records this run's own


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def shapes_signature(net: nn.Module) -> str:
    """sha256 over a network's state-dict keys and shapes: two networks agree iff a node fits both."""
    items = sorted((k, tuple(v.shape)) for k, v in net.state_dict().items())
    return hashlib.sha256(repr(items).encode()).hexdigest()


def node_steps(num_nodes: int, degradation_steps: int) -> list[int]:
    """Degradation step of each node ``k = 0 .. N``: ``k * D // N`` (node 0 = before any update)."""
    return [k * degradation_steps // num_nodes for k in range(num_nodes + 1)]


class DisBack(DMD2):
    """DisBack: degradation recording, then DMD2 whose real score walks the recorded path back.

    Args:
        teacher, student, optim, total_steps, fake_score: as :class:`~diffdistill.methods.dmd2.DMD2`
            (``total_steps`` = ``train.steps``, both stages together).
        config: :class:`DisBackConfig`.
    """

    name = "disback"
    Config = DisBackConfig

    def __init__(self, teacher: Denoiser, student: Student, config: DisBackConfig,
                 optim: Optional[OptimConfig] = None, total_steps: int = 1000,
                 fake_score: Optional[Denoiser] = None) -> None:
        super().__init__(teacher, student, config, optim, total_steps, fake_score)
        self.teacher_score = self.real_score  # the guided teacher: node 0's target
        fake = self.nets["fake_score"]
        # the frozen network that holds the current node (not registered: never checkpointed or optimised);
        # in the teacher's dtype when it has weights (a bf16 teacher evaluates its nodes in bf16 too)
        dtype = next((p.dtype for p in teacher.parameters() if p.is_floating_point()), torch.float32)
        self.node_net = copy.deepcopy(fake).to(dtype).eval().requires_grad_(False)
        self.node_score = CFGDenoiser(self.node_net, config.guidance_scale)
        self.student_signature = {"class": type(student.net).__name__, "levels": list(student.levels),
                                  "sample_shape": list(teacher.sample_shape), "num_classes": teacher.num_classes,
                                  "shapes_sha256": shapes_signature(student.net)}
        self.fake_signature = shapes_signature(fake)
        self.path_dir: Optional[Path] = None  # where the nodes are (this run's or path_from's)
        self.path: dict[str, Any] = {}  # path.json
        self.run_dir: Optional[Path] = None
        self.is_main = True
        if config.path_from:  # walk another run's path: no stage 1, the fake score starts at its end
            self.path_dir = Path(config.path_from).expanduser() / PATH_DIR
            self.path = self._read_path(self.path_dir, require_complete=True)
            self.num_nodes, self.degradation_steps = int(self.path["num_nodes"]), 0
            self._load_node_into(fake, self.num_nodes)
        else:
            self.num_nodes, self.degradation_steps = config.num_nodes, config.degradation_steps
        self._validate_walk(config, total_steps)
        # the walk's state (saved in each checkpoint's meta.json): the current target and the stage-2
        # iterations spent on it; node N = still recording (stage 1)
        self.node = self.num_nodes if self.degradation_steps > 0 else self.num_nodes - 1
        self.since = 0
        self.used = self.node  # the node the last step ran with (what status() logs)
        self.loaded: Optional[int] = None  # the node now in node_net / real_score
        self._before: Optional[list[Tensor]] = None  # stage 1: the fake score's weights before this step's update
        self._before_step = -1

    # ----------------------------------------------------------------------------------------------
    # Config checks
    def _validate_walk(self, cfg: DisBackConfig, total_steps: int) -> None:
        n, d = self.num_nodes, self.degradation_steps
        if n < 1:
            raise UserError(f"disback.num_nodes must be >= 1, got {n}")
        if not 0 < cfg.degradation_lr_scale <= 1:
            raise UserError(f"disback.degradation_lr_scale must be in (0, 1], got {cfg.degradation_lr_scale}")
        if cfg.interval < 1:
            raise UserError(f"disback.interval must be >= 1, got {cfg.interval}")
        if not cfg.path_from and d < n:
            raise UserError(f"disback.degradation_steps ({d}) must be >= disback.num_nodes ({n}) so that the "
                            "nodes are distinct")
        need = d + (n - 1) * cfg.interval + 1  # the teacher becomes the target after (N-1) intervals
        if total_steps < need:
            raise UserError(f"train.steps={total_steps} never reaches the teacher: DisBack needs at least {need} "
                            f"(degradation_steps {d} + (num_nodes - 1) x interval {(n - 1) * cfg.interval} + 1)")

    # ----------------------------------------------------------------------------------------------
    # The step
    def train_step(self, batch: Batch, step: int) -> StepOutput:
        """Stage 1: the fake-score loss on frozen ``G0``'s samples (group ``fake_score`` only; the student
        gets no loss, so it does not change). Stage 2: DMD2's step, counted from the stage's start (the
        two time-scale rule and ``gan_start_step``), with the current node as the real score."""
        if self.run_dir is None:
            raise RuntimeError("DisBack.on_train_start(run_dir, step, is_main) must run before the first step")
        if step < self.degradation_steps:
            self.used = self.num_nodes
            if self.config.degradation_lr_scale != 1 and self._before_step != step:  # once per step
                with torch.no_grad():
                    self._before = [p.detach().clone() for p in self._fake_params()]
                self._before_step = step
            x_in, s_in, cond, _ = self.generator_input(batch)
            with torch.no_grad():
                x = self.student.net(x_in, s_in, cond)
            loss, logs = self.critic_loss(x.float(), cond, batch, gan_on=False)
            return StepOutput({"fake_score": loss}, logs)
        if self.loaded != self.node or self.node >= self.num_nodes:
            raise RuntimeError(f"DisBack step {step} has target node {self.node} but node {self.loaded} is "
                               "loaded: call on_step_end(step + 1) after every step")
        self.used = self.node
        return super().train_step(batch, step - self.degradation_steps)

    # ----------------------------------------------------------------------------------------------
    # Hooks
    def on_train_start(self, run_dir: Path, step: int, is_main: bool) -> None:
        """Set up the path for a fresh or resumed run: in stage 1 (main process) keep the nodes recorded
        up to ``step`` and record the one due at ``step``; in stage 2 check the path and load the target."""
        self.run_dir, self.is_main = Path(run_dir), is_main
        self.node_net.to(self.device)
        if not self.config.path_from:
            self.path_dir = self.run_dir / PATH_DIR
            if step < self.degradation_steps:
                if is_main:
                    self._resume_recording(step)
            else:
                self.path = self._read_path(self.path_dir, require_complete=True)
        if self.node < self.num_nodes:
            self._switch(self.node, barrier=False)  # nothing is written in stage 2: no race to wait for
        self.used = self.node

    def on_step_end(self, step: int) -> dict[str, float]:
        """After ``step`` iterations: record node ``k`` when ``step == k D // N`` (stage 1, main process);
        at ``step == D`` the path is complete and the walk starts at node ``N-1``; in stage 2 move to the
        previous node after every ``interval`` iterations on one node, and stay on node 0 (the teacher)."""
        d = self.degradation_steps
        if step <= d:  # a degradation iteration just ended
            self._scale_update()
            steps = node_steps(self.num_nodes, d)
            if step in steps and self.is_main:
                self._record(steps.index(step))
            if step == d:
                self.node, self.since = self.num_nodes - 1, 0
                self._switch(self.node, barrier=True)  # the main process has written every node by now
            return {}
        self.since += 1
        if self.since >= self.config.interval and self.node > 0:
            self.node, self.since = self.node - 1, 0
            self._switch(self.node, barrier=True)
        return {}

    def _fake_params(self) -> list[Tensor]:
        return [p for p in self.nets["fake_score"].parameters() if p.requires_grad]

    def _scale_update(self) -> None:
        """``theta <- theta_before + a (theta_after - theta_before)``: AdamW's update ``-lr (wd theta + m/(sqrt v
        + eps))`` scaled by ``a`` is exactly AdamW at lr ``a lr``, since its moments depend on the gradients
        only (clipping comes before). The optimizer belongs to the Stepper and keeps one lr for both stages,
        so the scale is applied here; the copy exists in stage 1 only, when the student's optimizer state
        does not exist yet."""
        if self._before is None:
            return
        a = self.config.degradation_lr_scale
        with torch.no_grad():
            for p, p0 in zip(self._fake_params(), self._before):
                p.copy_(p0 + a * (p - p0))
        self._before = None

    def status(self) -> dict[str, float]:
        """``disback_node``: the target of the last step (``N`` while recording); ``disback_stage``: 1 or 2."""
        return {"disback_node": float(self.used), "disback_stage": 1.0 if self.used >= self.num_nodes else 2.0}

    def extra_state(self) -> dict[str, Any]:
        return {"disback": {"node": self.node, "since": self.since, "num_nodes": self.num_nodes,
                            "degradation_steps": self.degradation_steps,
                            "path_dir": str(self.path_dir) if self.config.path_from else ""}}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        s = state.get("disback")
        if not s:
            return
        saved = (s["num_nodes"], s["degradation_steps"], s.get("path_dir", ""))
        now = (self.num_nodes, self.degradation_steps, str(self.path_dir) if self.config.path_from else "")
        if saved != now:
            raise UserError(f"this run was started with DisBack (num_nodes, degradation_steps, path_from) = {saved}, "
                            f"the config now gives {now}: resume with the run's own settings")
        self.node, self.since = int(s["node"]), int(s["since"])
        self.used = self.node

    # ----------------------------------------------------------------------------------------------
    # Recording (main process, stage 1)
    def _new_path(self) -> dict[str, Any]:
        return {"format": FORMAT, "num_nodes": self.num_nodes, "degradation_steps": self.degradation_steps,
                "complete": False, "student": self.student_signature, "fake_score_sha256": self.fake_signature,
                "nodes": []}

    def _resume_recording(self, step: int) -> None:
        """Keep the nodes recorded at or before ``step`` (a resumed run retraces the same weights, so any
        later ones are dropped and recorded again), insist on those before it, and record the one at it."""
        self.path_dir.mkdir(parents=True, exist_ok=True)
        path = self._new_path()
        if step > 0 and (self.path_dir / PATH_FILE).is_file():  # a fresh run overwrites any stale path
            old = self._read_path(self.path_dir, require_complete=False)
            path["nodes"] = [n for n in old["nodes"] if n["step"] <= step]
        have = {n["node"] for n in path["nodes"]}
        steps = node_steps(self.num_nodes, self.degradation_steps)
        lost = [k for k, s in enumerate(steps) if s < step and k not in have]
        if lost:
            raise UserError(f"{self.path_dir} lacks node(s) {lost} recorded before step {step}: they cannot be "
                            "recovered from this checkpoint; start the run again in a new folder")
        for n in path["nodes"]:
            self._check_file(self.path_dir, n)
        self.path = path
        self._write_path()
        if step in steps and steps.index(step) not in have:
            self._record(steps.index(step))

    def _record(self, k: int) -> None:
        """Write node ``k`` (the fake score now) and its entry in ``path.json``."""
        from safetensors.torch import save_file

        fake = self.nets["fake_score"]
        state = {key: v.detach().to("cpu").contiguous().clone() for key, v in fake.state_dict().items()}
        file = self.path_dir / f"node-{k:02d}.safetensors"
        step = node_steps(self.num_nodes, self.degradation_steps)[k]
        meta = {"disback_node": json.dumps({"node": k, "step": step})}  # one key: safetensors orders keys randomly
        atomic_file(file, lambda tmp: save_file(state, str(tmp), metadata=meta))
        entry = {"node": k, "step": step, "file": file.name, "sha256": file_sha256(file), "bytes": file.stat().st_size}
        self.path["nodes"] = [n for n in self.path["nodes"] if n["node"] != k] + [entry]
        self.path["nodes"].sort(key=lambda n: n["node"])
        self.path["complete"] = len(self.path["nodes"]) == self.num_nodes + 1
        self._write_path()

    def _write_path(self) -> None:
        text = json.dumps(self.path, indent=2)
        atomic_file(self.path_dir / PATH_FILE, lambda tmp: tmp.write_text(text))

    # ----------------------------------------------------------------------------------------------
    # Reading and loading (every process)
    def _read_path(self, path_dir: Path, require_complete: bool) -> dict[str, Any]:
        """``path.json``, checked against this run's student and fake score (and complete, if asked)."""
        where = path_dir / PATH_FILE
        if not where.is_file():
            raise UserError(f"no DisBack path in {path_dir.parent} (expected {where})")
        try:
            path = json.loads(where.read_text())
            nodes = {int(n["node"]) for n in path["nodes"]}
            n_nodes = int(path["num_nodes"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"corrupt {where}: {e}") from None
        if path.get("student") != self.student_signature:
            raise UserError(f"the DisBack path in {path_dir} was recorded for another student "
                            f"({path.get('student')}), not this one ({self.student_signature})")
        if path.get("fake_score_sha256") != self.fake_signature:
            raise UserError(f"the DisBack path in {path_dir} was recorded for another fake-score network "
                            "(its node files do not fit this teacher's architecture)")
        if require_complete:
            missing = sorted(set(range(n_nodes + 1)) - nodes)
            if not path.get("complete") or missing:
                raise UserError(f"the DisBack path in {path_dir} is incomplete (missing nodes {missing}): resume "
                                "the run that records it until its degradation stage ends")
            for n in path["nodes"]:
                self._check_file(path_dir, n)
        return path

    def _check_file(self, path_dir: Path, entry: dict[str, Any]) -> None:
        """Cheap check of a node file: present, recorded size, and a header whose keys / shapes fit the fake
        score (the sha256 is checked when the node is loaded)."""
        from safetensors import safe_open

        file = path_dir / entry["file"]
        if not file.is_file():
            raise UserError(f"DisBack node {entry['node']} is missing: {file}")
        if file.stat().st_size != entry["bytes"]:
            raise UserError(f"DisBack node file {file} is corrupt: {file.stat().st_size} bytes, recorded "
                            f"{entry['bytes']}")
        try:
            with safe_open(str(file), "pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - any unreadable header is a corrupt file to the user
            raise UserError(f"corrupt DisBack node file {file}: {str(e).splitlines()[0] if str(e) else e!r}") from None
        self._check_keys(file, shapes, self.nets["fake_score"])

    @staticmethod
    def _check_keys(file: Path, shapes: dict[str, tuple], net: nn.Module) -> None:
        want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        missing, unexpected = sorted(want.keys() - shapes.keys()), sorted(shapes.keys() - want.keys())
        reshaped = sorted(k for k in want.keys() & shapes.keys() if want[k] != shapes[k])
        parts = [f"{what} {keys[:3]}" for what, keys in (("missing", missing), ("unexpected", unexpected),
                                                          ("other shapes", reshaped)) if keys]
        if parts:
            raise UserError(f"DisBack node {file} does not fit the network: {', '.join(parts)}")

    def _load_node_into(self, net: nn.Module, k: int) -> None:
        """Strictly load node ``k``'s file into ``net``: recorded sha256, readable, exactly its keys."""
        entry = next((n for n in self.path["nodes"] if int(n["node"]) == k), None)
        if entry is None:
            raise UserError(f"DisBack node {k} is not in {self.path_dir / PATH_FILE}")
        file = self.path_dir / entry["file"]
        if not file.is_file():
            raise UserError(f"DisBack node {k} is missing: {file}")
        digest = file_sha256(file)
        if digest != entry["sha256"]:
            raise UserError(f"DisBack node file {file} is corrupt or changed: sha256 {digest[:12]}..., recorded "
                            f"{entry['sha256'][:12]}...")
        state = load_safetensors(file)  # unreadable -> one-line UserError
        self._check_keys(file, {key: tuple(v.shape) for key, v in state.items()}, net)
        with torch.no_grad():
            net.load_state_dict(state, strict=True)

    def _switch(self, k: int, barrier: bool) -> None:
        """Make node ``k`` the real score: node 0 is the (guided) teacher itself, any other the frozen
        ``node_net`` loaded strictly from its file. ``barrier``: wait until every process (hence the main
        process, which writes the nodes) reaches this point before reading."""
        if barrier and self.accelerator is not None and self.accelerator.num_processes > 1:
            self.accelerator.wait_for_everyone()
        if not self.path.get("complete"):  # other processes than the main one read it here, once
            self.path = self._read_path(self.path_dir, require_complete=True)
        if k == 0:
            self.real_score = self.teacher_score
        else:
            self._load_node_into(self.node_net, k)
            self.real_score = self.node_score
        self.loaded = k

    def target_weights(self) -> dict[str, Tensor]:
        """The current target's weights (node 0: the teacher's), for inspection and tests."""
        net = self.teacher if self.loaded == 0 else self.node_net
        return {k: v.detach().clone() for k, v in net.state_dict().items()}


METHOD = DisBack
