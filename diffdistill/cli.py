"""Command line: ``diffdistill {quickstart, teacher train, train, sample, eval, export}``.

Every user mistake prints one line (``error: ...``) and exits with status 2; a diverged run exits 1.
``python -m diffdistill`` is the same command, so ``torchrun`` / ``accelerate launch -m diffdistill``
run any training command on several processes unchanged.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from .errors import GAMMA_HELP, UserError, positive_int


class _Parser(argparse.ArgumentParser):
    """argparse, but usage mistakes are one line and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=100 (repeatable)")
    p.add_argument("--output", help="run folder (overrides output_dir)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")


def _load_cfg(args, method: Optional[str] = None):
    from .config import apply_overrides, config_from_dict, read_yaml

    data = apply_overrides(read_yaml(args.config), args.overrides)
    if method is not None:
        if data.get("method", method) != method:
            raise UserError(f"'teacher train' trains a teacher (method: {method}); {args.config} has method: {data['method']}")
        data["method"] = method
    if args.output:
        data["output_dir"] = args.output
    return config_from_dict(data)


def cmd_train(args, method: Optional[str] = None) -> int:
    from .training.loop import train

    cfg = _load_cfg(args, method)
    run = train(cfg, resume=args.resume)
    print(f"run saved in {run}")
    return 0


def _parse_labels(text: Optional[str]) -> Optional[list[int]]:
    if not text:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip() != ""]
    except ValueError:
        raise UserError(f"--labels expects comma-separated integers, got {text!r}") from None


def _read_prompts(path: Optional[str]) -> Optional[list[str]]:
    if not path:
        return None
    from .data import PromptDataset

    return list(PromptDataset(path))


def cmd_sample(args) -> int:
    from .generator import apply_gamma, check_guidance_scale, load_generator, save_grid, save_pngs

    out = Path(args.out)
    if out.exists() and any(out.glob("[0-9]" * 6 + ".png")):
        raise UserError(f"{out} already holds samples; choose an empty or new folder")
    labels = _parse_labels(args.labels)
    prompts = _read_prompts(args.prompts)
    if args.num_samples is None:  # one sample per prompt (or per listed label) unless asked for more
        given = prompts if prompts is not None else labels
        if not given:
            raise UserError("--num-samples is required (without it, --prompts FILE or --labels give one sample each)")
        args.num_samples = len(given)
    if args.num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {args.num_samples}")
    gen = load_generator(args.checkpoint, sampler=args.sampler, steps=args.steps,  # a stage student for --steps K
                         guidance_scale=args.guidance_scale)
    check_guidance_scale(gen, args.guidance_scale, prompts is not None)
    apply_gamma(gen, args.gamma)
    images = gen.sample(args.num_samples, steps=args.steps, labels=labels, prompts=prompts, seed=args.seed,
                        batch_size=args.batch_size, progress=True)
    save_pngs(images, out)
    save_grid(images, out / "grid.png")
    print(f"wrote {len(images)} samples ({gen.nfe(args.steps)} NFE each) and grid.png to {out}")
    return 0


def cmd_export(args) -> int:
    from .export import export_generator

    path = export_generator(args.checkpoint, args.out, merge=args.merge, steps=args.steps)
    print(f"exported to {path} (see {path / 'README.md'} for the diffusers code that samples it)")
    return 0


def cmd_quickstart(args) -> int:
    from .quickstart import run_quickstart

    run_quickstart(args.output, steps=args.steps, num_samples=args.num_samples)
    return 0


def cmd_config_show(args) -> int:
    from .config import show_config

    print(show_config(args.method))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffdistill", description="Diffusion step distillation")
    try:
        from importlib.metadata import PackageNotFoundError, version

        ver = version("diffdistill")
    except PackageNotFoundError:  # a source checkout on PYTHONPATH, not installed
        from . import __version__ as ver
    parser.add_argument("--version", action="version", version=f"diffdistill {ver}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    q = sub.add_parser("quickstart", help="distil the shipped digits teacher with DMD2 and report digits FID")
    q.add_argument("--output", default="runs/quickstart", help="output folder (default: runs/quickstart)")
    q.add_argument("--steps", type=positive_int, default=None, help="training steps (default: the config's)")
    q.add_argument("--num-samples", type=positive_int, default=2000, help="samples per FID (default: 2000)")
    q.set_defaults(func=cmd_quickstart)

    t = sub.add_parser("teacher", help="teacher commands")
    tsub = t.add_subparsers(dest="teacher_command", required=True, parser_class=_Parser)
    tt = tsub.add_parser("train", help="train a teacher (a diffusers UNet2DModel) on a dataset")
    _train_args(tt)
    tt.set_defaults(func=lambda a: cmd_train(a, method="dsm"))

    tr = sub.add_parser("train", help="distil a student")
    _train_args(tr)
    tr.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="sample images from a teacher or a checkpoint")
    s.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or teacher folder")
    s.add_argument("--num-samples", type=positive_int, default=None,
                   help="how many samples (default: one per --prompts line or --labels entry)")
    s.add_argument("--out", required=True, help="output folder for 000000.png ... and grid.png")
    s.add_argument("--steps", type=positive_int, default=None, help="student steps, or the teacher solver's steps")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--labels", default=None, help="class labels, repeated cyclically, e.g. 0,3,7")
    s.add_argument("--prompts", default=None, help="text file with one prompt per line")
    s.add_argument("--batch-size", type=positive_int, default=256)
    s.add_argument("--sampler", default="heun", choices=["heun", "euler", "ddim"], help="teacher ODE solver")
    s.add_argument("--guidance-scale", type=float, default=None,
                   help="teachers: classifier-free guidance scale of the ODE (default 1: none)")
    s.add_argument("--gamma", type=float, default=None, help=GAMMA_HELP)
    s.set_defaults(func=cmd_sample)

    from .eval_cli import add_eval_parser

    add_eval_parser(sub)

    from .convert import add_convert_parser

    add_convert_parser(sub)  # convert edm SNAPSHOT.pkl --out DIR

    e = sub.add_parser("export", help="export a trained student as a folder plain diffusers samples")
    e.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or student artefact folder")
    e.add_argument("--out", required=True, help="new (or empty) output folder")
    e.add_argument("--merge", action="store_true", help="LoRA students: write full merged weights, not an adapter")
    e.add_argument("--steps", type=positive_int, default=None,
                   help="export the student at this many steps (default: its own)")
    e.set_defaults(func=cmd_export)

    c = sub.add_parser("config", help="config commands")
    csub = c.add_subparsers(dest="config_command", required=True, parser_class=_Parser)
    cs = csub.add_parser("show", help="every config key: type, default, allowed values and doc")
    cs.add_argument("method", nargs="?", default=None, help="also list this method's own section (e.g. dmd2)")
    cs.set_defaults(func=cmd_config_show)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .training.loop import TrainingDiverged

    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
