"""The student artefact: a trained generator that describes itself, loadable without the training method.

Every checkpoint holds one in ``checkpoints/step-NNNNNNN/student/`` (any folder with a ``student.json`` is
one); a progressive run (TSCD) also keeps each stage's student, at the step its stage ended, in
``RUN/stages/steps-K/`` (K = the stage's segments = its sampling steps; :func:`select_artefact`)::

    student.json            what to build: format, kind, method, teacher, conditioning, members, router
    <member>.safetensors    each member's weights (the whole network; for a LoRA member the adapter only)
    null_text.safetensors   a text student's empty-prompt encoding (its unconditional input)

``student.json``::

    {"format": 1, "kind": "student" | "denoiser",   # denoiser: integrated by an ODE solver (teacher runs)
     "method": "dmd2", "step": 1500, "teacher": "assets/teachers/digits", "teacher_resolved": "/abs/...",
     "guidance_scale": 1.0, "latent": false, "text": false,
     "sample_shape": [1, 16, 16], "num_classes": 10,
     "members": [{"name": "student", "weights": "student.safetensors",
                  "network": {... the denoiser's spec(): class, constructor config ...},
                  "lora": null | {"rank": 64, "alpha": 64, "target_modules": "..."},   # base = the teacher
                  "wrapper": {"type": "plain"} | {"type": "consistency", "sigma_min": s, "sigma_data": sd}
                             | {"type": "boot", "s_min": a, "s_max": b, "net_sigma_min": t},
                  "levels": [157.4], "renoise": "fresh"}],
     "router": null | {"type": "classes", "groups": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]}
               | {"type": "text_pca", "num_students": K, "mean": [...], "components": [[...]], "tree": {...}}}

:func:`load_artefact` builds the sampled model from this alone: the member networks from their specs
(no random initialisation: parameters are created empty and assigned from the file), strict weight loading
(a missing, unexpected or corrupt tensor is one :class:`UserError` line), the teacher's UNet only as a LoRA
member's base, and the teacher's VAE / text encoders / tokenizers only for latent or text students. No
fake score, GAN head, optimizer state or EMA bookkeeping is ever built, and nothing in
:mod:`diffdistill.training` is imported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .denoiser import Denoiser, EDMPrecond
from .errors import UserError
from .students import RoutedStudent, Student, add_lora, lora_parameters_state

FORMAT = 1
ARTEFACT_DIR = "student"
SPEC_FILE = "student.json"
STAGES_DIR = "stages"  # progressive runs (TSCD): one artefact per stage, RUN/stages/steps-K/


# --------------------------------------------------------------------------------------------------
# Describing a model
def _wrapper_of(student: Student) -> tuple[dict, Denoiser]:
    """The student's wrapper description and the bare network under it."""
    from .methods.boot import BootStudent
    from .methods.consistency import ConsistencyDenoiser

    net = student.net
    if isinstance(student, BootStudent):
        return {"type": "boot", "s_min": student.s_min, "s_max": student.s_max,
                "net_sigma_min": student.tau_min}, net
    if isinstance(net, ConsistencyDenoiser):
        return {"type": "consistency", "sigma_min": net.sigma_min, "sigma_data": net.sigma_data}, net.inner
    return {"type": "plain"}, net


def network_spec(net: nn.Module) -> dict:
    """A JSON-able constructor description of a bare denoiser (``net.spec()``), or a clear error."""
    spec = getattr(net, "spec", None)
    if spec is None:
        raise ValueError(f"{type(net).__name__} cannot be described in a student artefact (it has no spec()); "
                         "students must be VPUNetDenoiser or EDMPrecond networks")
    return spec()


def _member(name: str, student: Optional[Student], net: nn.Module, wrapper: dict) -> tuple[dict, dict]:
    lora = getattr(net, "lora_config", None)
    state = lora_parameters_state(net) if lora else net.state_dict()
    entry = {"name": name, "weights": f"{name}.safetensors", "network": network_spec(net), "lora": lora,
             "wrapper": wrapper, "levels": None if student is None else list(student.levels),
             "renoise": None if student is None else student.renoise}
    return entry, {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous().clone()
                   for k, v in state.items()}


def describe(model: Any) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """``(spec, {weights file: state})`` for a :class:`Student`, a :class:`RoutedStudent` or a bare
    :class:`Denoiser` (sampled with an ODE solver)."""
    if isinstance(model, RoutedStudent):
        members = [(f"student_{k}", m) for k, m in enumerate(model.members)]
        router = (model.text_partition.to_json() if model.text_partition is not None
                  else {"type": "classes", "groups": [list(g) for g in model.groups]})
    elif isinstance(model, Student):
        members, router = [("student", model)], None
    elif isinstance(model, Denoiser):
        entry, state = _member("denoiser", None, model, {"type": "plain"})
        return {"kind": "denoiser", "members": [entry], "router": None}, {entry["weights"]: state}
    else:
        raise ValueError(f"cannot describe a {type(model).__name__} as a student artefact")
    entries, files = [], {}
    for name, student in members:
        wrapper, net = _wrapper_of(student)
        entry, state = _member(name, student, net, wrapper)
        entries.append(entry)
        files[entry["weights"]] = state
    return {"kind": "student", "members": entries, "router": router}, files


def _bare_network(model: Any) -> Denoiser:
    """The (first member's) network under its wrapper."""
    if isinstance(model, Denoiser):
        return model
    return _wrapper_of(model.members[0] if isinstance(model, RoutedStudent) else model)[1]


def save_artefact(model: Any, folder: Path, info: dict) -> None:
    """Write the artefact of ``model`` (see the module docstring) into the new folder ``folder``.

    ``info``: run facts recorded beside the members (``method``, ``teacher``, ``guidance_scale``, ``step``,
    ``latent``). Callers write into a temporary checkpoint folder that is renamed into place, so the
    artefact appears atomically with its checkpoint.
    """
    from safetensors.torch import save_file

    spec, files = describe(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bare = _bare_network(model)
    teacher = info.get("teacher")
    resolved = None
    if teacher:
        from .paths import resolve_path

        p = Path(resolve_path(str(teacher)))
        resolved = str(p.resolve()) if p.exists() else None
    spec = {"format": FORMAT, **spec, **{k: v for k, v in info.items() if k not in ("members", "router", "kind")},
            "teacher_resolved": resolved, "sample_shape": list(bare.sample_shape), "num_classes": bare.num_classes,
            "text": bool(getattr(bare, "is_text", False)), "latent": bool(info.get("latent", False))}
    for name, state in files.items():
        save_file(state, str(folder / name))
    null = getattr(bare, "null_text", None)
    if null is not None:
        save_file({k: getattr(null, k).detach().cpu().contiguous().clone() for k in ("embeds", "pooled", "time_ids")
                   if getattr(null, k) is not None}, str(folder / "null_text.safetensors"))
    (folder / SPEC_FILE).write_text(json.dumps(spec, indent=2))


# --------------------------------------------------------------------------------------------------
# Loading
@dataclass
class Artefact:
    """A loaded artefact: ``model`` (what to sample), its ``spec`` and the teacher ``components``
    (VAE / text stack bundle, ``None`` for pixel class-conditional or unconditional students)."""

    model: Any
    spec: dict
    components: Any = None
    folder: Optional[Path] = None

    @property
    def members(self) -> list[Any]:
        m = self.model
        return list(m.members) if isinstance(m, RoutedStudent) else [m]


def find_artefact(path: str | Path) -> Optional[Path]:
    """The artefact folder of ``path``: itself, ``path/student`` (a checkpoint), or the latest checkpoint's
    (a run folder); ``None`` when there is none."""
    from .checkpoint_io import latest_checkpoint

    p = Path(path)
    for cand in (p, p / ARTEFACT_DIR):
        if (cand / SPEC_FILE).is_file():
            return cand
    ck = latest_checkpoint(p)
    if ck is not None and (ck / ARTEFACT_DIR / SPEC_FILE).is_file():
        return ck / ARTEFACT_DIR
    return None


def read_spec(folder: Path) -> dict:
    path = Path(folder) / SPEC_FILE
    try:
        spec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"corrupt or unreadable student artefact {path}: {e}") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT or not spec.get("members"):
        raise UserError(f"{path} is not a diffdistill student artefact of format {FORMAT}")
    return spec


def build_network(spec: dict) -> Denoiser:
    """A denoiser from its ``spec()`` (parameters left uninitialised on the meta device when possible)."""
    kind = spec.get("class")
    if kind == "VPUNetDenoiser":
        from .teachers.vp import VPUNetDenoiser

        return VPUNetDenoiser.from_spec(spec)
    if kind == "EDMNetDenoiser":  # EDM's SongUNet / ADM (converted EDM teachers and their students)
        from .teachers.edm import build_edm_denoiser

        return build_edm_denoiser(spec, "student artefact")
    if kind == "EDMPrecond":  # raw networks with a spec(): the toy MLP
        raw = spec["net"]
        if raw.get("class") != "toy.MLP":
            raise UserError(f"student artefact names an unknown raw network {raw.get('class')!r}")
        from .toy import MLP

        return EDMPrecond(MLP(**raw["config"]), spec["sample_shape"], spec["sigma_min"], spec["sigma_max"],
                          spec["sigma_data"], spec.get("num_classes"))
    raise UserError(f"student artefact names an unknown network class {kind!r}")


def _teacher_path(spec: dict) -> str:
    from .paths import resolve_path

    for cand in (spec.get("teacher"), spec.get("teacher_resolved")):
        if cand and Path(resolve_path(str(cand))).exists():
            return resolve_path(str(cand))
    raise UserError(f"this student needs its teacher's files ({spec.get('teacher')!r}: its UNet for a LoRA "
                    "student, its VAE / text encoders for latent or text students) and that folder is missing")


def _load_member(entry: dict, folder: Path, device: torch.device, teacher: Any) -> Denoiser:
    from .checkpoint_io import load_safetensors

    state = load_safetensors(folder / entry["weights"])
    if entry.get("lora"):
        import copy

        base = teacher.denoiser
        net = add_lora(copy.deepcopy(base).float(), **entry["lora"])
        expected = set(lora_parameters_state(net))
    else:
        from accelerate import init_empty_weights

        with init_empty_weights():  # no random initialisation: every parameter is assigned from the file
            net = build_network(entry["network"])
        expected = set(net.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise UserError(f"{folder / entry['weights']} does not match its network: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")
    try:
        net.load_state_dict(state, strict=False, assign=not entry.get("lora"))
    except RuntimeError as e:
        raise UserError(f"{folder / entry['weights']} does not match its network: {str(e).splitlines()[0]}") from None
    return net.to(device).eval()


def wrap_member(entry: dict, net: Denoiser) -> Any:
    w = entry.get("wrapper") or {"type": "plain"}
    if entry.get("levels") is None:
        return net
    if w["type"] == "consistency":
        from .methods.consistency import ConsistencyDenoiser

        net = ConsistencyDenoiser(net, w["sigma_min"], w["sigma_data"])
    elif w["type"] == "boot":
        from .methods.boot import BootStudent

        return BootStudent(net, w["s_min"], w["s_max"], w["net_sigma_min"])
    elif w["type"] != "plain":
        raise UserError(f"student artefact names an unknown wrapper {w['type']!r}")
    return Student(net, entry["levels"], entry.get("renoise") or "fresh")


def load_artefact(folder: str | Path, device: str | torch.device = "cpu") -> Artefact:
    """Build the sampled model of the artefact in ``folder`` (see the module docstring)."""
    folder = Path(folder)
    spec = read_spec(folder)
    device = torch.device(device)
    members = spec["members"]
    needs_unet = any(m.get("lora") for m in members)
    teacher = None
    if needs_unet or spec.get("text") or spec.get("latent"):
        from .teachers import load_teacher

        teacher = load_teacher(_teacher_path(spec), device=device, with_unet=needs_unet)
    nets = [_load_member(m, folder, device, teacher) for m in members]
    null_file = folder / "null_text.safetensors"
    if null_file.is_file():
        from .checkpoint_io import load_safetensors
        from .denoiser import TextCond

        null = TextCond(**load_safetensors(null_file))
        for net in nets:
            net.null_text = null
    built = [wrap_member(m, n) for m, n in zip(members, nets)]
    router = spec.get("router")
    if router:
        kind = router.get("type")
        if kind == "text_pca":  # prompts routed by their pooled embedding (MSD on a text teacher)
            from .partitions import PCAPartition

            model: Any = RoutedStudent(built, PCAPartition.from_json(router))
        elif kind == "classes":
            model = RoutedStudent(built, router["groups"])
        else:
            raise UserError(f"student artefact names an unknown router {kind!r}")
    else:
        model = built[0]
    if teacher is not None:
        teacher.denoiser = None  # a LoRA base lives on inside the member; the bundle keeps only components
    return Artefact(model, spec, teacher, folder)


# --------------------------------------------------------------------------------------------------
# Stage students (progressive methods, TSCD): RUN/stages/steps-K/, one artefact per stage
def stage_dir(run_dir: str | Path, steps: int) -> Path:
    """Where a progressive run keeps the student of its stage trained for ``steps`` steps (segments)."""
    return Path(run_dir) / STAGES_DIR / f"steps-{int(steps)}"


def save_artefact_atomic(model: Any, folder: str | Path, info: dict) -> Path:
    """:func:`save_artefact` into a temporary sibling of ``folder``, then renamed into place (an earlier
    ``folder`` is replaced only once the new one is whole), so readers see the old artefact or the new one."""
    from .paths import atomic_folder

    with atomic_folder(folder) as tmp:
        save_artefact(model, tmp, info)
    return Path(folder)


def _run_and_step(path: Path) -> tuple[Path, Optional[int]]:
    """``(run folder, step limit)`` of ``path``: a run folder (no limit) or one of its checkpoint folders
    (only stage students written at or before that checkpoint's step belong to it)."""
    from .checkpoint_io import CKPT_DIR

    meta = path / "meta.json"
    if path.parent.name == CKPT_DIR and meta.is_file():
        try:
            return path.parent.parent, int(json.loads(meta.read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return path.parent.parent, None
    return path, None


def stage_artefacts(path: str | Path) -> dict[int, Path]:
    """The stage students a progressive run kept: ``{steps: folder}`` (empty for other runs and folders).

    ``path``: a run folder, or one of its checkpoint folders (then only the stages that had ended by its step)."""
    run, limit = _run_and_step(Path(path))
    root = run / STAGES_DIR
    found: dict[int, tuple[int, Path]] = {}
    if not root.is_dir():
        return {}
    for d in sorted(root.iterdir()):
        if d.name.startswith(".") or not (d / SPEC_FILE).is_file():
            continue
        spec = read_spec(d)
        step = int(spec.get("step") or 0)
        levels = spec["members"][0].get("levels")
        if not levels or (limit is not None and step > limit):
            continue
        k = len(levels)
        if k not in found or step >= found[k][0]:
            found[k] = (step, d)
    return {k: d for k, (_, d) in found.items()}


def prune_stage_artefacts(run_dir: str | Path, after_step: int) -> list[Path]:
    """Remove the stage students of ``run_dir`` written after step ``after_step`` (a fresh run over an old
    folder, or a resume from a checkpoint older than them: the training from there writes them again)."""
    import shutil

    removed = []
    root = Path(run_dir) / STAGES_DIR
    if not root.is_dir():
        return removed
    for d in sorted(root.iterdir()):
        if d.name.startswith(".") and (".tmp-" in d.name or ".old-" in d.name):
            shutil.rmtree(d, ignore_errors=True)  # left by a write that was killed
            continue
        if (d / SPEC_FILE).is_file() and int(read_spec(d).get("step") or 0) > after_step:
            shutil.rmtree(d)
            removed.append(d)
    return removed


def select_artefact(path: str | Path, steps: Optional[int] = None) -> tuple[Optional[Path], Optional[str]]:
    """The artefact that samples ``path`` at ``steps`` steps, and a one-line note saying which (or ``None``).

    A run that kept stage students (TSCD: RUN/stages/steps-K) gives, for ``steps=K``, the student of the
    stage trained for K segments; when no stage has K, the note says so and the latest checkpoint's student
    is used (its own levels regridded to K). Every other case is :func:`find_artefact`."""
    default = find_artefact(path)
    if steps is None:
        return default, None
    stages = stage_artefacts(path)
    if not stages:
        return default, None
    if steps in stages:
        return stages[steps], f"using the {steps}-step stage student {stages[steps]}"
    kept = ", ".join(str(k) for k in sorted(stages, reverse=True))
    note = f"no stage student with {steps} steps in {stages[max(stages)].parent} (kept: {kept} steps); "
    if default is None:
        return None, note
    own = read_spec(default)["members"][0].get("levels") or []
    how = "its own levels" if len(own) == steps else f"levels regridded from its own {len(own)}"
    return default, note + f"sampling {default} at {steps} steps on {how}"


__all__ = ["Artefact", "save_artefact", "load_artefact", "find_artefact", "describe", "build_network",
           "read_spec", "wrap_member", "save_artefact_atomic", "stage_dir", "stage_artefacts",
           "prune_stage_artefacts", "select_artefact", "ARTEFACT_DIR", "SPEC_FILE", "STAGES_DIR"]
