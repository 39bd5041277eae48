"""Run configuration: YAML into typed, validated dataclasses.

Unknown keys are rejected with a "did you mean" suggestion; every value is checked against its key's
type and allowed values, declared beside the type (``steps: PositiveInt``, ``Literal["no", "bf16",
"fp16"]``, see :mod:`diffdistill.schema`), each failure one line naming the key, the value and what is
allowed. ``--set a.b=v`` overrides are parsed as YAML scalars. The method's own hyperparameters live in
a section named after the method (``dmd2:``, ``ict:`` ...), validated against that method's ``Config``
dataclass. ``diffdistill config show [METHOD]`` prints the whole schema (:func:`show_config`).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml

from .errors import UserError
from .paths import resolve_path
from .schema import (Count, Interval, Keys, Len, MinLen, NonNegFloat, OneOf, PositiveFloat, PositiveInt, check_value,
                     format_table, schema_rows)


def _unet_keys() -> list[str]:
    """What ``student.small`` may override: the constructor arguments of the diffusers UNets and of EDM's
    networks (``SongUNet`` / ``DhariwalUNet``, e.g. ``num_blocks``, ``model_channels``)."""
    import inspect

    from .networks.edm import DhariwalUNet, SongUNet
    from .teachers.vp import unet_config_keys

    keys = set(unet_config_keys())
    for cls in (SongUNet, DhariwalUNet):
        keys |= {k for k, p in inspect.signature(cls.__init__).parameters.items()
                 if k != "self" and p.kind is not p.VAR_KEYWORD}
    return sorted(keys)


def _lr_schedules() -> list[str]:
    from diffusers.optimization import SchedulerType

    # piecewise_constant needs step rules that no config key carries
    return [s.value for s in SchedulerType if s.value != "piecewise_constant"]


def _method_names() -> list[str]:
    from .methods import METHOD_MODULES

    return sorted(METHOD_MODULES)


@dataclass
class TeacherConfig:
    path: str = ""  # diffusers folder, Hub id, or a run folder written by `diffdistill teacher train`
    guidance_scale: NonNegFloat = 1.0  # classifier-free guidance on the teacher (1 = plain conditional)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights dtype of the frozen teacher


@dataclass
class DataConfig:
    name: Literal["digits", "folder", "toy2d", "prompts"] = "digits"  # the dataset kind
    path: str = ""  # image folder (folder), prompt file (prompts)
    resolution: PositiveInt = 16  # images are resized and centre-cropped to this size
    channels: Optional[Literal[1, 3]] = None  # 1 or 3; null keeps the data's own (digits: 1, folder: 3)
    # latent teachers: encode the images once with the teacher's VAE and reuse the latents in every run
    # (safetensors under ~/.cache/diffdistill/latents, keyed by a hash of the images and the VAE)
    cache_latents: bool = False


@dataclass
class StudentConfig:
    # copy (teacher weights) | small (smaller net, `small` overrides) | lora
    kind: Literal["copy", "small", "lora"] = "copy"
    steps: PositiveInt = 1  # sampling steps of the student
    # explicit descending sigmas; default: evenly spaced timesteps
    levels: Optional[Annotated[list[NonNegFloat], MinLen(1)]] = None
    lora_rank: PositiveInt = 64  # LoRA rank (kind: lora)
    # constructor overrides for kind: small (keys of the teacher's diffusers UNet config)
    small: Annotated[dict, Keys(_unet_keys, "diffusers UNet2DModel / UNet2DConditionModel or EDM network arguments")] = \
        field(default_factory=dict)
    renoise: Literal["fresh", "ddim"] = "fresh"  # between steps: fresh noise (DMD2) or ddim (deterministic, TSCD/PCM)


@dataclass
class TrainConfig:
    steps: PositiveInt = 1000  # optimisation steps (generator + critic turns count as one step)
    batch_size: PositiveInt = 32  # global batch size, split across processes (and micro-batches)
    # micro-batches per step (gradient accumulation): train.batch_size stays the global batch, so results
    # match grad_accum 1 up to float rounding; must divide batch_size / processes
    grad_accum: PositiveInt = 1
    seed: Count = 0  # seeds data order and every random draw
    lr: PositiveFloat = 1e-4  # AdamW learning rate of every trained network (methods may set their own)
    betas: Annotated[list[Annotated[float, Interval(ge=0, lt=1)]], Len(2, 2)] = \
        field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    weight_decay: NonNegFloat = 0.01  # AdamW weight decay
    grad_clip: NonNegFloat = 10.0  # max gradient norm (0 disables)
    lr_schedule: Annotated[str, OneOf(_lr_schedules, "diffusers.optimization schedule names")] = \
        "constant_with_warmup"  # a diffusers.optimization schedule name
    warmup_steps: Count = 0  # LR warm-up steps
    ema_decay: Annotated[float, Interval(ge=0, lt=1)] = 0.0  # EMA of the student for evaluation (0 disables)
    # power-function EMA warm-up (diffusers EMAModel use_ema_warmup): after n updates the decay is
    # min(ema_decay, 1 - n^-ema_power): an averaging window of ~n^p updates, growing with training (p = 1: the
    # uniform average of every iterate);
    # 0 keeps diffusers' default warm-up min(ema_decay, (1 + n) / (10 + n))
    ema_power: Annotated[float, Interval(ge=0, le=1)] = 0.0
    checkpoint_every: PositiveInt = 500  # save a checkpoint every N steps (and at the end)
    keep_checkpoints: Count = 3  # keep the newest N checkpoints (0 keeps all)
    sample_every: Count = 500  # write a sample grid every N steps (0 disables)
    log_every: PositiveInt = 10  # log losses every N steps
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # fp16 uses a gradient scaler (CUDA only)
    # start every trained network that this checkpoint holds (run folder: its latest) from its weights, with
    # fresh optimizers at step 0: a later stage of a recipe (DMD2 SD1.5 stage 2 from stage 1); "" = none
    init_from: str = ""


@dataclass
class Config:
    # dmd2, ict, cd, tscd, boot, disback, msd (dsm trains a teacher)
    method: Annotated[str, OneOf(_method_names, "a registered method")] = "dmd2"
    output_dir: str = "runs/default"  # run folder
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method_config: Any = None  # the method's own section, filled by `load_config`


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``: unknown keys and wrong types raise :class:`UserError`."""
    if not isinstance(data, dict):
        raise UserError(f"config section '{where or cls.__name__}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls, include_extras=True)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            close = difflib.get_close_matches(key, sorted(names), n=1)
            hint = f"; did you mean '{(where + '.') if where else ''}{close[0]}'?" if close else ""
            raise UserError(f"unknown config key '{path}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value or {}, path)
            continue
        kwargs[key] = check_value(value, tp, path)  # its type and allowed values (see diffdistill.schema)
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain YAML-able data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` overrides (values parsed as YAML) to a nested dict."""
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
            value = raw.strip()  # YAML 1.1 reads no/yes/on/off as booleans: keep the word (mixed_precision=no)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {key}: '{p}' is not a section")
        node[parts[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; a missing or malformed file is a :class:`UserError`. A shipped config
    (``configs/digits/dmd2.yaml``) is found from any folder, see :func:`diffdistill.paths.resolve_path`."""
    p = Path(resolve_path(str(path)))
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {p} is not valid YAML{_yaml_where(e)}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must hold a mapping at the top level")
    return data


def _yaml_where(e: Exception) -> str:
    """`` at line L, column C: problem`` of a PyYAML error (1-based), as one line."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{where}: {' '.join(str(problem).split())}"


def config_from_dict(data: dict) -> Config:
    """Validate a whole config dict, including the method's own section."""
    from .methods import METHOD_MODULES, get_method

    data = dict(data)
    method = data.get("method", Config.method)
    if method not in METHOD_MODULES:
        close = difflib.get_close_matches(str(method), sorted(METHOD_MODULES), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"unknown method {method!r}{hint} (choose {', '.join(sorted(METHOD_MODULES))})")
    section = data.pop(method, None) or {}
    for other in METHOD_MODULES:
        if other in data:
            raise UserError(f"method is '{method}' but the config's method section is '{other}:' (each method reads "
                            f"only its own section): rename '{other}:' to '{method}:' if its keys apply, or drop it, "
                            f"or set method={other}")
    data.pop("method_config", None)
    cfg = from_dict(Config, data)
    cfg.method_config = from_dict(get_method(method).Config, section, method)
    _one_guidance_scale(cfg, section)
    return cfg


def _one_guidance_scale(cfg: Config, section: dict) -> None:
    """``teacher.guidance_scale`` is the one source of truth for methods that guide the teacher: it fills
    the method's own ``guidance_scale`` unless that is set too, in which case the two must agree."""
    if not hasattr(cfg.method_config, "guidance_scale"):
        return
    if "guidance_scale" not in section:
        cfg.method_config.guidance_scale = cfg.teacher.guidance_scale
    elif cfg.method_config.guidance_scale != cfg.teacher.guidance_scale:
        raise UserError(f"{cfg.method}.guidance_scale={cfg.method_config.guidance_scale} disagrees with "
                        f"teacher.guidance_scale={cfg.teacher.guidance_scale}; set only teacher.guidance_scale")


def load_config(path: str | Path | None = None, overrides: Optional[list[str]] = None,
                base: Optional[dict] = None) -> Config:
    """Load a YAML config (or start from ``base``), apply ``--set`` overrides, validate."""
    data = read_yaml(path) if path is not None else dict(base or {})
    return config_from_dict(apply_overrides(data, overrides or []))


def config_to_yaml_dict(cfg: Config) -> dict:
    """The resolved config as saved in run folders and checkpoints (method section under its name)."""
    d = to_dict(cfg)
    d.pop("method_config")
    d[cfg.method] = to_dict(cfg.method_config)
    return d


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_yaml_dict(cfg), sort_keys=False))


def show_config(method: Optional[str] = None) -> str:
    """The schema as a table: every key with its type, default, allowed values and doc — the common
    sections, then ``method``'s own section (``None``: a line naming the methods instead)."""
    from .methods import METHOD_MODULES, get_method

    rows = schema_rows(Config, skip=("method_config",))
    if method is not None:
        if method not in METHOD_MODULES:
            close = difflib.get_close_matches(str(method), sorted(METHOD_MODULES), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UserError(f"unknown method {method!r}{hint} (choose {', '.join(sorted(METHOD_MODULES))})")
        rows += schema_rows(get_method(method).Config, prefix=f"{method}.")
    text = format_table(rows)
    if method is None:
        text += (f"\n\nEach method also reads its own section ({', '.join(sorted(METHOD_MODULES))}): "
                 "diffdistill config show METHOD lists its keys.")
    return text
