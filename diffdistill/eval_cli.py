"""``diffdistill eval fid`` and ``diffdistill eval clip``: argparse wiring around :mod:`diffdistill.metrics`.

``diffdistill.cli`` calls :func:`add_eval_parser` to register the sub-command and :func:`run_eval` to run
it. Run on several processes with ``accelerate launch -m diffdistill eval fid ...``: the samples are
split across processes and the features gathered (see :func:`diffdistill.metrics.evaluate_fid`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

from .errors import UserError


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``eval`` with its ``fid`` and ``clip`` sub-commands on an argparse ``subparsers`` object."""
    # positive_int: --num-samples, --steps, --batch-size are whole numbers >= 1, one line otherwise
    from .errors import GAMMA_HELP, positive_int

    parser = subparsers.add_parser("eval", help="measure FID or CLIP score of a teacher or student")
    parser.set_defaults(func=run_eval)  # diffdistill.cli calls args.func(args)
    sub = parser.add_subparsers(dest="eval_command", metavar="{fid,clip}", required=True)

    fid = sub.add_parser("fid", help="FID (+ precision/recall) of generated samples against reference statistics")
    fid.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or teacher folder")
    fid.add_argument("--num-samples", type=positive_int, required=True, help="generated images (papers: 50000)")
    fid.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: the model's own)")
    fid.add_argument("--out", required=True, help="result JSON file")
    ref = fid.add_mutually_exclusive_group()
    ref.add_argument("--ref-stats", metavar="FILE.npz", help=".npz with mu and sigma (e.g. EDM fid-refs)")
    ref.add_argument("--ref-images", metavar="DIR", help="folder of reference images (statistics cached)")
    ref.add_argument("--ref-dataset", choices=["digits"], help="embedded dataset (default when no reference given)")
    fid.add_argument("--features", choices=["inception", "digits"], default=None,
                     help="feature network (default: digits for the digits reference, else inception)")
    fid.add_argument("--inception-weights", metavar="FILE", default=None,
                     help="local weights-inception-2015-12-05-6726825d.pth (default: $DIFFDISTILL_CACHE)")
    fid.add_argument("--batch-size", type=positive_int, default=64, help="images per generation batch, per process")
    fid.add_argument("--seed", type=int, default=0, help="run seed (batch b uses a seed derived from it)")
    fid.add_argument("--guidance-scale", type=float, default=None, help="teachers: classifier-free guidance scale")
    fid.add_argument("--gamma", type=float, default=None, help=GAMMA_HELP)
    fid.set_defaults(eval_func=_run_fid)

    clip = sub.add_parser("clip", help="CLIP score of one generated image per prompt (open_clip, local weights)")
    clip.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or teacher folder")
    clip.add_argument("--prompts", required=True, metavar="FILE", help="text file, one prompt per line")
    clip.add_argument("--out", required=True, help="result JSON file")
    clip.add_argument("--clip-model", default="ViT-g-14", help="open_clip model name or model-config .json")
    clip.add_argument("--clip-weights", metavar="FILE", default=None, help="local open_clip checkpoint")
    clip.add_argument("--clip-scale", choices=["raw", "100"], default="raw", help="raw cosine or 100 x cosine")
    clip.add_argument("--clip-prefix", default="A photo depicts ", help="prepended to every caption")
    clip.add_argument("--no-clamp", action="store_true", help="do not clamp each sample's score at 0")
    clip.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: the model's own)")
    clip.add_argument("--batch-size", type=positive_int, default=16, help="images per generation batch")
    clip.add_argument("--seed", type=int, default=0, help="run seed")
    clip.add_argument("--guidance-scale", type=float, default=None, help="teachers: classifier-free guidance scale")
    clip.add_argument("--gamma", type=float, default=None, help=GAMMA_HELP)
    clip.set_defaults(eval_func=_run_clip)
    return parser


def run_eval(args: argparse.Namespace) -> int:
    """Run the parsed ``eval`` sub-command; returns the exit status (user mistakes raise ``UserError``)."""
    for name in ("num_samples", "batch_size"):
        if getattr(args, name, 1) is not None and getattr(args, name, 1) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer")
    return args.eval_func(args)


def _accelerator() -> Any | None:
    """An ``accelerate.Accelerator`` when launched on several processes, else ``None``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())  # cpu=True: gloo over processes (torchrun on a CPU)


def _load_generator(path: str, device: torch.device, steps: Optional[int] = None,
                    guidance_scale: Optional[float] = None, prompts: bool = False,
                    gamma: Optional[float] = None) -> Any:
    from . import load_generator
    from .generator import apply_gamma, check_guidance_scale

    if not Path(path).exists():
        raise UserError(f"checkpoint not found: {path}")
    generator = load_generator(path, steps=steps, guidance_scale=guidance_scale)  # --steps K: a stage student
    check_guidance_scale(generator, guidance_scale, prompts)
    apply_gamma(generator, gamma)
    if hasattr(generator, "to"):
        generator = generator.to(device) or generator
    return generator


def _write_json(result: dict, out: str) -> None:
    from .metrics.evaluate import to_jsonable

    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(to_jsonable(result), indent=2) + "\n")
    tmp.replace(path)


def _run_fid(args: argparse.Namespace) -> int:
    from .metrics import DigitsFeatures, InceptionV3Features, evaluate_fid, resolve_ref_stats

    if args.num_samples < 2:
        raise UserError("--num-samples must be at least 2 (a covariance needs two samples)")
    accelerator = _accelerator()
    device = accelerator.device if accelerator else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    features = args.features or ("inception" if (args.ref_stats or args.ref_images) else "digits")
    with accelerator.main_process_first() if accelerator else contextlib.nullcontext():
        # the main process trains / caches the digits classifier and reference statistics first
        extractor = (InceptionV3Features(args.inception_weights) if features == "inception" else DigitsFeatures())
        extractor = extractor.to(device)
        ref = resolve_ref_stats(extractor, args.ref_stats, args.ref_images, args.ref_dataset)
    generator = _load_generator(args.checkpoint, device, args.steps, args.guidance_scale, gamma=args.gamma)
    result = evaluate_fid(generator, extractor, ref, args.num_samples, steps=args.steps, batch_size=args.batch_size,
                          seed=args.seed, accelerator=accelerator)
    result = {"metric": "fid", "checkpoint": str(args.checkpoint), **result}
    if args.gamma is not None:
        result["gamma"] = args.gamma  # TCD sampling of a deterministic student
    if getattr(generator, "artefact", None) is not None:
        result["artefact"] = str(generator.artefact)  # e.g. the stage student that --steps picked
    if accelerator is None or accelerator.is_main_process:
        _write_json(result, args.out)
        pr = "" if result["precision"] is None else f", precision {result['precision']:.3f}, recall {result['recall']:.3f}"
        print(f"FID {result['fid']:.3f} ({features} features, {result['num_samples']} samples, "
              f"{result['steps']} steps, NFE {result['nfe']}{pr}) -> {args.out}")
    return 0


def _run_clip(args: argparse.Namespace) -> int:
    from .metrics.clip import ClipScorer, evaluate_clip, read_prompts

    prompts = read_prompts(args.prompts)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scorer = ClipScorer.from_files(args.clip_model, args.clip_weights, device=device, scale=args.clip_scale,
                                   clamp=not args.no_clamp, prefix=args.clip_prefix)
    generator = _load_generator(args.checkpoint, device, args.steps, args.guidance_scale, prompts=True,
                                gamma=args.gamma)
    result = evaluate_clip(generator, scorer, prompts, steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    result = {"metric": "clip_score", "checkpoint": str(args.checkpoint), **result}
    if args.gamma is not None:
        result["gamma"] = args.gamma
    _write_json(result, args.out)
    print(f"CLIP score {result['clip_score']:.4f} ({result['recipe']['backbone']}, scale {args.clip_scale}, "
          f"{result['num_samples']} prompts) -> {args.out}")
    return 0
