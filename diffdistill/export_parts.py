"""The pieces every export shares: the scheduler that reproduces a student's levels in plain diffusers, the
model card, the pipeline folders of text students (see :mod:`diffdistill.export`)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Optional

from .errors import UserError

CARD = "README.md"


def _scheduler_levels(sched: Any, steps: int) -> list[float]:
    """Sigma-space levels a diffusers scheduler visits after ``set_timesteps(steps)``."""
    sched.set_timesteps(steps)
    if hasattr(sched, "sigmas") and type(sched).__name__.startswith("Euler"):
        return [float(s) for s in sched.sigmas[:-1]]
    abar = sched.alphas_cumprod.double()
    return [float(((1 - abar[int(t)]) / abar[int(t)]).sqrt()) for t in sched.timesteps]


def _close(a: list[float], b: list[float], rtol: float = 1e-4) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= rtol * max(abs(y), 1e-8) for x, y in zip(a, b))


def student_scheduler(scheduler_config: dict, levels: list[float], renoise: str) -> Any:
    """The diffusers scheduler whose ``set_timesteps(len(levels))`` + ``step`` loop is the student's sampler.

    See the module docstring for the choice; raises :class:`UserError` when none reproduces the levels.
    """
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, LCMScheduler

    base = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    base.update(clip_sample=False, thresholding=False, steps_offset=0)

    def build(cls: Any, **extra: Any) -> Any:  # only the keys ``cls`` takes (no "ignored config" warnings)
        accepted = inspect.signature(cls.__init__).parameters
        return cls.from_config({k: v for k, v in {**base, **extra}.items() if k in accepted})

    k = len(levels)
    deterministic = k == 1 or renoise == "ddim"
    if deterministic:
        candidates = [build(DDIMScheduler, timestep_spacing="trailing", set_alpha_to_one=True),
                      build(EulerDiscreteScheduler, timestep_spacing="trailing", use_karras_sigmas=True,
                            sigma_max=levels[0], sigma_min=levels[-1]),
                      build(EulerDiscreteScheduler, timestep_spacing="trailing", use_exponential_sigmas=True,
                            sigma_max=levels[0], sigma_min=levels[-1])]
    else:
        candidates = [build(LCMScheduler, original_inference_steps=k, timestep_scaling=1e8, set_alpha_to_one=True)]
    for sched in candidates:
        try:
            if _close(_scheduler_levels(sched, k), levels):
                sched.set_timesteps(k)
                return sched
        except (ValueError, IndexError):
            continue
    kind = "deterministic (ddim)" if deterministic else "fresh-noise"
    raise UserError(f"no diffusers scheduler reproduces this {k}-step {kind} student's levels "
                    f"{[round(s, 4) for s in levels]}: trailing teacher timesteps (DDIM / LCM) or, for deterministic "
                    "steps, a Karras or geometric grid (Euler) are expressible; export it with --steps 1, or train it on such "
                    "levels")


def _known_fid(source: Path, method: str, steps: int) -> Optional[float]:
    """A student FID measured by ``diffdistill quickstart`` next to the run (``report.json``), if any."""
    for folder in [source, *source.parents][:5]:
        report = folder / "report.json"
        if report.is_file():
            try:
                rows = json.loads(report.read_text()).get("rows", [])
            except (OSError, json.JSONDecodeError):
                return None
            for r in rows:
                if r.get("model") == "student" and r.get("method") == method and r.get("steps") == steps:
                    return float(r["fid"])
    return None


def _card(facts: dict, code: str) -> str:
    fid = facts.get("fid")
    fid_text = f"{fid:.3f} ({facts.get('fid_source')})" if fid is not None else "not measured"
    lines = ["---", "library_name: diffusers", "tags: [diffdistill, distillation]", "---", "",
             f"# {facts['method']} student of `{facts['teacher']}`", "",
             f"Exported by diffdistill from `{facts['source']}` (step {facts.get('step')}).", "",
             "| | |", "|---|---|",
             f"| method | {facts['method']} |", f"| teacher | `{facts['teacher']}` |",
             f"| steps (network evaluations) | {facts['steps']} |",
             f"| noise levels (sigma) | {', '.join(f'{s:.4g}' for s in facts['levels'])} |",
             f"| timesteps | {facts['timesteps']} |",
             f"| scheduler | `{facts['scheduler']}` |",
             f"| conditioning | {facts['conditioning']} |",
             f"| measured FID | {fid_text} |",
             f"| match to diffdistill's sampler | {facts['tolerance']} |", "",
             "## Sample with plain diffusers", "", "```python", code.strip(), "```", ""]
    if facts.get("notes"):
        lines += ["## Notes", "", *[f"- {n}" for n in facts["notes"]], ""]
    lines += ["`diffdistill sample --checkpoint THIS_FOLDER --num-samples 16 --out samples/` samples it too, "
              "in the same steps.", ""]
    return "\n".join(lines)


def _write_index(folder: Path, index: dict) -> None:
    import diffusers

    (folder / "model_index.json").write_text(json.dumps({**index, "_diffusers_version": diffusers.__version__},
                                                        indent=2))


def _check_text_components(art: Any) -> None:
    """A text student exports as a StableDiffusion(XL)Pipeline: its teacher's text encoders and VAE are needed."""
    comps = art.components
    if comps is None or not comps.text_encoders:
        raise UserError("a text student needs its teacher's text encoders and VAE to export a pipeline")
    if comps.vae is None:  # e.g. students of assets/teachers/digits_text
        raise UserError("a pixel-space text student (its teacher has no VAE) has no diffusers pipeline class to export "
                        "to; sample it with `diffdistill sample --prompts FILE`")


def _text_pipeline(unet: Any, art: Any, sched: Any):
    _check_text_components(art)
    comps = art.components
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if len(comps.text_encoders) == 2:
        return StableDiffusionXLPipeline(vae=comps.vae, text_encoder=comps.text_encoders[0],
                                         text_encoder_2=comps.text_encoders[1], tokenizer=comps.tokenizers[0],
                                         tokenizer_2=comps.tokenizers[1], unet=unet, scheduler=sched,
                                         force_zeros_for_empty_prompt=True)
    return StableDiffusionPipeline(vae=comps.vae, text_encoder=comps.text_encoders[0], tokenizer=comps.tokenizers[0],
                                   unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _write_text_pipeline(folder: Path, unet: Any, art: Any, sched: Any) -> None:
    _text_pipeline(unet, art, sched).save_pretrained(str(folder), safe_serialization=True)
