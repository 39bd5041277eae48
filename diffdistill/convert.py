"""``diffdistill convert edm SNAPSHOT.pkl --out DIR``: an official EDM snapshot to an EDM teacher folder,
without executing anything from the file.

EDM's snapshots (``network-snapshot-*.pkl``, ``edm-imagenet-64x64-cond-adm.pkl``, ...) are pickles written by
its training loop: ``{"ema": net, "loss_fn": ..., "augment_pipe": ..., "dataset_kwargs": {...}}``. Every
network object is pickled by EDM's ``torch_utils.persistence`` as a call of ``_reconstruct_persistent_obj(meta)``
where ``meta = {"type": "class", "version": 6, "module_src": <the whole Python module's source>, "class_name":
..., "state": <the object's __dict__>}``; EDM's unpickler ``exec``s ``module_src``. A pickle may name any
callable, so ``pickle.load`` on a downloaded file runs whatever the file says.

:class:`SnapshotUnpickler` resolves only an allowlist of names, each to a stand-in written here that builds
data and calls nothing from the file:

- ``_reconstruct_persistent_obj`` -> a :class:`Record` (class name, state, sha256 of the never-executed source);
- ``torch.nn.ModuleDict`` / ``ModuleList`` / ``Sequential`` -> a :class:`Record` holding their state;
- tensors: ``_rebuild_tensor_v2`` / ``_rebuild_parameter`` over storages read by ``torch.load(weights_only=True)``
  (``torch.storage._load_from_bytes``'s payload is a legacy ``torch.save`` of one storage);
- ``collections.OrderedDict``, ``set``, ``frozenset``, ``torch.Size``, torch dtypes, numeric numpy scalars and
  dtypes, ``dnnlib.EasyDict`` (as a plain dict).

Any other name is refused before anything is built (one line, exit status 2). From the ``ema`` record only
the constructor arguments (checked against the known arguments of ``EDMPrecond`` and its network) and the
tensors are taken; diffdistill's own :class:`~diffdistill.teachers.edm.EDMNetDenoiser` is built from them and
the weights load strictly. ``map_augment`` (EDM's augmentation-label input, unused when sampling; DMD2 deletes
it too) is dropped, so every parameter of the converted network is used.
"""

from __future__ import annotations

import collections
import hashlib
import inspect
import io
import math
import pickle
from pathlib import Path
from typing import Any, Optional

import torch

from .errors import UserError

PRECOND_ARGS = ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_min", "sigma_max", "sigma_data",
                "model_type")
EDM_CLASSES = {"EDMPrecond", "SongUNet", "DhariwalUNet", "UNetBlock", "Linear", "Conv2d", "GroupNorm",
               "PositionalEmbedding", "FourierEmbedding", "ModuleDict", "ModuleList", "Sequential"}


class RefusedGlobal(Exception):
    """The pickle names a callable or class outside the allowlist."""


class Record:
    """An object of the snapshot kept as data: its class name and state; nothing is constructed or run."""

    class_name: str = ""
    state: Any = None
    source_sha256: Optional[str] = None

    def __init__(self, class_name: str = "", state: Any = None, source_sha256: Optional[str] = None) -> None:
        self.class_name, self.state, self.source_sha256 = class_name, state, source_sha256

    def __setstate__(self, state: Any) -> None:  # BUILD of a torch container module
        self.state = state


def _container(name: str) -> type:
    """A :class:`Record` type standing for a torch container module (built by ``__new__``, then its state)."""
    return type(name, (Record,), {"class_name": name})


class _EasyDict(dict):
    """``dnnlib.EasyDict`` as a plain dict."""


def _persistent(meta: Any) -> Record:
    """Stand-in for ``torch_utils.persistence._reconstruct_persistent_obj``: the record, never the source."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str) \
            or not isinstance(meta.get("module_src"), str) or not isinstance(meta.get("state"), dict):
        raise RefusedGlobal("torch_utils.persistence._reconstruct_persistent_obj with a malformed record")
    return Record(meta["class_name"], meta["state"], hashlib.sha256(meta["module_src"].encode()).hexdigest())


def _load_from_bytes(data: bytes) -> Any:
    """A storage from a legacy ``torch.save`` payload, read by torch's weights-only unpickler."""
    if not isinstance(data, (bytes, bytearray)):
        raise RefusedGlobal("torch.storage._load_from_bytes with a non-bytes payload")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _rebuild_tensor(storage: Any, offset: int, size: tuple, stride: tuple, *_ignored: Any) -> torch.Tensor:
    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise RefusedGlobal("torch._utils._rebuild_tensor_v2 over something that is not a storage")
    return torch._utils._rebuild_tensor(storage, int(offset), tuple(size), tuple(stride))


def _rebuild_parameter(data: Any, *_ignored: Any) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise RefusedGlobal("torch._utils._rebuild_parameter over something that is not a tensor")
    return data.detach()


def _rebuild_from_type(func: Any, new_type: Any, args: tuple, _state: Any = None) -> torch.Tensor:
    if func not in (_rebuild_tensor, _rebuild_parameter) or new_type not in (torch.Tensor, torch.nn.Parameter):
        raise RefusedGlobal("torch._tensor._rebuild_from_type_v2 with a callable or type outside the allowlist")
    return func(*args)


def _np_dtype(name: Any, *_ignored: Any):
    import numpy as np

    dtype = np.dtype(name) if isinstance(name, str) else None
    if dtype is None or dtype.kind not in "biuf":
        raise RefusedGlobal(f"numpy.dtype({name!r})")
    return dtype


def _np_scalar(dtype: Any, data: Any = None) -> Any:
    import numpy as np

    if not isinstance(dtype, np.dtype) or dtype.kind not in "biuf" or not isinstance(data, (bytes, bytearray)):
        raise RefusedGlobal("numpy scalar of a non-numeric type")
    return np.frombuffer(bytes(data), dtype=dtype)[0].item()


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch", "Tensor"): torch.Tensor,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    ("torch", "Size"): torch.Size,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("numpy", "dtype"): _np_dtype,
    ("numpy.core.multiarray", "scalar"): _np_scalar,
    ("numpy._core.multiarray", "scalar"): _np_scalar,
    **{("torch.nn.modules.container", n): _container(n) for n in ("ModuleDict", "ModuleList", "Sequential")},
}


class SnapshotUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only the allowlist above (see the module docstring)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise RefusedGlobal(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise RefusedGlobal(f"a persistent id {str(pid)[:40]!r}")


def read_snapshot(path: Path) -> Any:
    """Unpickle ``path`` with :class:`SnapshotUnpickler`; a refused name or an unreadable file is a
    :class:`UserError` naming it (nothing from the file has run)."""
    try:
        with open(path, "rb") as f:
            return SnapshotUnpickler(f).load()
    except RefusedGlobal as e:
        raise UserError(f"{path}: refusing to load '{e}': an EDM snapshot holds only tensors, plain containers and "
                        "EDM's network records; nothing from the file was run and nothing was written") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # noqa: BLE001 - any other failure is a malformed file to the user
        text = str(e).strip().splitlines()
        raise UserError(f"{path} is not a readable EDM snapshot ({type(e).__name__}"
                        f"{': ' + text[0] if text else ''})") from None


def _state_dict(record: Record, prefix: str = "") -> dict[str, torch.Tensor]:
    """The state dict of a module record (parameters, persistent buffers, children), EDM's key names."""
    if not isinstance(record, Record) or not isinstance(record.state, dict):
        raise UserError(f"snapshot module '{prefix.rstrip('.') or 'ema'}' is not a network record")
    if record.class_name not in EDM_CLASSES:
        raise UserError(f"snapshot module '{prefix.rstrip('.') or 'ema'}' is a {record.class_name!r}, not one of "
                        "EDM's network classes")
    state = record.state
    skip = set(state.get("_non_persistent_buffers_set") or ())
    out: dict[str, torch.Tensor] = {}
    for key in ("_parameters", "_buffers"):
        for name, t in (state.get(key) or {}).items():
            if t is None or (key == "_buffers" and name in skip):
                continue
            if not isinstance(t, torch.Tensor):
                raise UserError(f"snapshot tensor '{prefix}{name}' is a {type(t).__name__}, not a tensor")
            out[prefix + name] = t
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(_state_dict(child, f"{prefix}{name}."))
    return out


def _plain(value: Any) -> bool:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return True
    return isinstance(value, (list, tuple)) and all(_plain(v) for v in value)


def _network_args(network: str) -> set[str]:
    """EDM's constructor arguments of ``network`` (ours minus the ones EDM does not have)."""
    from .networks.edm import NETWORKS

    params = set(inspect.signature(NETWORKS[network].__init__).parameters) - {"self", "fourier_scale"}
    return params - {"img_resolution", "in_channels", "out_channels", "label_dim"}


def edm_teacher_from_snapshot(snapshot: Any, key: str = "ema", sigma_min: float = 0.002, sigma_max: float = 80.0):
    """``(denoiser, source)``: the :class:`~diffdistill.teachers.edm.EDMNetDenoiser` of ``snapshot[key]`` (an
    unpickled :class:`Record` tree) with its weights, and the provenance recorded in the teacher folder."""
    from .teachers.edm import EDMNetDenoiser

    if not isinstance(snapshot, dict) or key not in snapshot:
        keys = sorted(snapshot) if isinstance(snapshot, dict) else type(snapshot).__name__
        raise UserError(f"the snapshot has no '{key}' entry (it holds {keys})")
    ema = snapshot[key]
    if not isinstance(ema, Record) or ema.class_name != "EDMPrecond":
        what = ema.class_name if isinstance(ema, Record) else type(ema).__name__
        raise UserError(f"snapshot['{key}'] is a {what!r}; diffdistill converts EDM-preconditioned networks "
                        "(EDMPrecond; VPPrecond, VEPrecond and iDDPMPrecond are not supported)")
    init_args, kwargs = ema.state.get("_init_args"), ema.state.get("_init_kwargs")
    if init_args or not isinstance(kwargs, dict):
        raise UserError(f"snapshot['{key}'] has no recorded constructor arguments (init_kwargs)")
    kwargs = dict(kwargs)
    network = kwargs.pop("model_type", "DhariwalUNet")
    if network not in ("SongUNet", "DhariwalUNet"):
        raise UserError(f"snapshot['{key}'] wraps a {network!r}; diffdistill builds SongUNet and DhariwalUNet")
    known = set(PRECOND_ARGS) | _network_args(network)
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise UserError(f"snapshot['{key}'] has constructor arguments EDM's {network} does not take: {unknown}")
    bad = sorted(k for k, v in kwargs.items() if not _plain(v))
    if bad:
        raise UserError(f"snapshot['{key}'] has constructor arguments that are not plain values: {bad}")
    precond = {k: kwargs.pop(k) for k in PRECOND_ARGS if k in kwargs}
    state = _state_dict(ema)
    dropped = sorted(k for k in state if k.startswith("model.map_augment."))
    for k in dropped:
        del state[k]
    kwargs["augment_dim"] = 0
    edm_min, edm_max = float(precond.get("sigma_min", 0)), float(precond.get("sigma_max", math.inf))
    try:
        with torch.device("meta"):  # no random initialisation: every tensor comes from the snapshot
            den = EDMNetDenoiser(network, kwargs, int(precond["img_resolution"]), int(precond["img_channels"]),
                                 int(precond.get("label_dim", 0)), max(sigma_min, edm_min), min(sigma_max, edm_max),
                                 float(precond.get("sigma_data", 0.5)))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"cannot build the snapshot's {network} from its constructor arguments ({e})") from None
    expected = set(den.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise UserError(f"the snapshot's weights do not match EDM's {network}: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")
    try:
        den.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    except RuntimeError as e:
        raise UserError(f"the snapshot's weights do not match EDM's {network}: "
                        f"{str(e).strip().splitlines()[-1].strip()}") from None
    source = {"format": "NVlabs/edm snapshot", "key": key, "class": "EDMPrecond", "network": network,
              "module_src_sha256": ema.source_sha256, "use_fp16": bool(precond.get("use_fp16", False)),
              "edm_sigma_min": repr(edm_min), "edm_sigma_max": repr(edm_max), "dropped": dropped}
    return den.eval(), source


def convert_edm(snapshot: str | Path, out: str | Path, key: str = "ema", sigma_min: float = 0.002,
                sigma_max: float = 80.0) -> Path:
    """Convert an EDM snapshot pickle into a new teacher folder ``out`` (see the module docstring)."""
    from .teachers.edm import save_edm_folder

    snapshot, out = Path(snapshot), Path(out)
    if not snapshot.is_file():
        raise UserError(f"EDM snapshot {snapshot} does not exist")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty folder; choose a new --out")
    data = snapshot.read_bytes()
    tree = read_snapshot(snapshot)
    den, source = edm_teacher_from_snapshot(tree, key, sigma_min, sigma_max)
    source = {"file": snapshot.name, "sha256": hashlib.sha256(data).hexdigest(), **source}
    return save_edm_folder(den, out, source)


def add_convert_parser(sub: Any) -> None:
    """``diffdistill convert edm SNAPSHOT.pkl --out DIR`` (registered by :mod:`diffdistill.cli`)."""
    c = sub.add_parser("convert", help="convert another framework's model into a diffdistill teacher folder")
    csub = c.add_subparsers(dest="convert_command", required=True, parser_class=type(c))  # one-line errors too
    e = csub.add_parser("edm", help="an official EDM snapshot (.pkl) -> EDM teacher folder; nothing in the "
                                    "pickle is executed")
    e.add_argument("snapshot", help="EDM's network-snapshot-*.pkl (or edm-*.pkl)")
    e.add_argument("--out", required=True, help="new (or empty) teacher folder")
    e.add_argument("--key", default="ema", help="the snapshot entry holding the network (default: ema)")
    e.add_argument("--sigma-min", type=float, default=0.002, help="lowest noise level of the teacher (EDM: 0.002)")
    e.add_argument("--sigma-max", type=float, default=80.0, help="highest noise level of the teacher (EDM: 80)")
    e.set_defaults(func=cmd_convert_edm)


def cmd_convert_edm(args: Any) -> int:
    out = convert_edm(args.snapshot, args.out, args.key, args.sigma_min, args.sigma_max)
    print(f"converted {args.snapshot} ({args.key}) into the EDM teacher folder {out}")
    return 0
