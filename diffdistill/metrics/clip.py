"""CLIP score with open_clip from a local checkpoint, with its whole recipe recorded.

``score = scale * max(cos(E_img(x), E_txt(prefix + caption)), 0)`` per sample, then averaged.
Scores are comparable only within one recipe (EVALUATION.md): the DMD2 / SDXL papers use open_clip
ViT-g-14 (laion2b_s12b_b42k), raw cosine, prefix "A photo depicts ", LANCZOS resize to 256 and a centre
crop; torchmetrics' ``CLIPScore`` uses transformers ViT-L/14 and ``100 * cos`` clamped on the mean. So the
backbone, the weights file and its sha256, the scale, the clamp and the prefix go into every result.
"""

from __future__ import annotations

import inspect
import pickle
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import UserError
from .evaluate import batch_seed
from .features import cache_dir, file_sha256, to_uint8_range

DEFAULT_CLIP_MODEL = "ViT-g-14"
DEFAULT_PREFIX = "A photo depicts "
PRE_RESIZE = 256  # LANCZOS resize + centre crop before open_clip's own transform (DMD2 recipe)


def resolve_model_name(model_name: str) -> str:
    """An open_clip model name, or the path of a model-config JSON (registered under its file stem)."""
    import open_clip

    if model_name.endswith(".json"):
        path = Path(model_name)
        if not path.is_file():
            raise UserError(f"CLIP model config not found: {path}")
        open_clip.add_model_config(path)
        return path.stem
    if model_name not in open_clip.list_models():
        raise UserError(f"unknown open_clip model {model_name!r} (e.g. ViT-g-14, ViT-L-14, ViT-B-32, "
                        f"or the path of a model-config .json)")
    return model_name


def find_clip_weights(model_name: str, weights: str | Path | None) -> Path:
    """The local open_clip checkpoint: ``weights`` or ``cache_dir()/open_clip-<name>.{safetensors,bin}``."""
    if weights is not None:
        if not Path(weights).is_file():
            raise UserError(f"CLIP weights file not found: {weights} (pass an open_clip checkpoint of "
                            f"{model_name} with --clip-weights FILE)")
        return Path(weights)
    candidates = [cache_dir() / f"open_clip-{model_name}{ext}" for ext in (".safetensors", ".bin")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise UserError(f"missing CLIP weights for {model_name} (nothing is downloaded at run time); looked in "
                    f"{', '.join(map(str, candidates))}; pass an open_clip checkpoint with --clip-weights FILE")


class ClipScorer(nn.Module):
    """Per-sample CLIP score of images in ``[-1, 1]`` against captions.

    Args:
        model: an open_clip ``CLIP`` model (``encode_image`` / ``encode_text``).
        preprocess: open_clip's validation transform (PIL image -> normalised tensor).
        tokenizer: open_clip tokenizer for ``model``.
        recipe: what identifies the numbers: ``backbone``, ``weights_file``, ``weights_sha256``.
        scale: ``"raw"`` (cosine, DMD2 / SDXL papers) or ``"100"`` (100 x cosine, torchmetrics).
        clamp: clamp each sample's score at 0.
        prefix: prepended to every caption (``"A photo depicts "``; ``""`` for none).
    """

    def __init__(self, model: nn.Module, preprocess: Any, tokenizer: Any, recipe: dict, scale: str = "raw",
                 clamp: bool = True, prefix: str = DEFAULT_PREFIX) -> None:
        super().__init__()
        if scale not in ("raw", "100"):
            raise UserError(f"CLIP score scale must be 'raw' or '100', got {scale!r}")
        self.model = model.eval().requires_grad_(False)
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.scale, self.clamp, self.prefix = scale, clamp, prefix
        self.recipe = {**recipe, "scale": scale, "clamp_per_sample_at_0": clamp, "caption_prefix": prefix,
                       "image_preprocess": f"lanczos-{PRE_RESIZE}-centre-crop, then open_clip val transform"}

    @classmethod
    def from_files(cls, model_name: str = DEFAULT_CLIP_MODEL, weights: str | Path | None = None,
                   device: torch.device | None = None, **kwargs: Any) -> ClipScorer:
        """Build ``model_name`` with open_clip and load the local checkpoint ``weights`` (never downloads)."""
        import open_clip

        name = resolve_model_name(model_name)
        path = find_clip_weights(name, weights)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(path),
                                                                         weights_only=True)
        except (RuntimeError, ValueError, KeyError, EOFError, OSError, pickle.UnpicklingError) as err:  # wrong architecture, pickled objects: one line naming the file
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"cannot load {path} as {name} open_clip weights ({first_line})") from None
        recipe = {"backbone": name, "weights_file": str(path), "weights_sha256": file_sha256(path)}
        scorer = cls(model, preprocess, open_clip.get_tokenizer(name), recipe, **kwargs)
        return scorer.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def _image_batch(self, images: Tensor) -> Tensor:
        from PIL import Image

        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        pixels = to_uint8_range(images).permute(0, 2, 3, 1).cpu().numpy()
        out = []
        for arr in pixels:
            im = Image.fromarray(arr)
            scale = PRE_RESIZE / min(im.size)  # short side -> 256 (LANCZOS), then centre crop 256
            im = im.resize((round(im.width * scale), round(im.height * scale)), Image.LANCZOS)
            left, top = (im.width - PRE_RESIZE) // 2, (im.height - PRE_RESIZE) // 2
            out.append(self.preprocess(im.crop((left, top, left + PRE_RESIZE, top + PRE_RESIZE))))
        return torch.stack(out)

    @torch.no_grad()
    def forward(self, images: Tensor, captions: Sequence[str]) -> Tensor:
        """Scores ``[N]`` (float32) of ``images`` ``[N, C, H, W]`` in ``[-1, 1]`` against ``captions``."""
        if len(captions) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
        device = next(self.model.parameters()).device
        img = self.model.encode_image(self._image_batch(images).to(device)).float()
        txt = self.model.encode_text(self.tokenizer([self.prefix + c for c in captions]).to(device)).float()
        cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
        cos = cos.clamp(min=0) if self.clamp else cos
        return cos * (100.0 if self.scale == "100" else 1.0)


def read_prompts(path: str | Path) -> list[str]:
    """Non-empty lines of a text file (one prompt per line)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompt file not found: {path}")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"{path} holds no prompts (one per line)")
    return prompts


def evaluate_clip(generator: Any, scorer: ClipScorer, prompts: Sequence[str], steps: int | None = None,
                  batch_size: int = 16, seed: int = 0, progress: bool = True) -> dict:
    """Generate one image per prompt and average their CLIP scores.

    Seeding as in :func:`~diffdistill.metrics.evaluate_fid`: per sample (``offset``) when the generator
    supports it, else ``seed * 1_000_003 + b`` for batch ``b``.
    """
    steps = generator.default_steps if steps is None else steps
    per_sample = "offset" in inspect.signature(generator.sample).parameters
    prompts = list(prompts)
    scores, t_start = [], time.perf_counter()
    for b, start in enumerate(tqdm(range(0, len(prompts), batch_size), desc="CLIP score", disable=not progress)):
        batch = prompts[start:start + batch_size]
        if per_sample:  # the generator picks prompts[(offset + i) % len(prompts)]
            images = generator.sample(len(batch), steps=steps, prompts=prompts, seed=seed, batch_size=batch_size,
                                      offset=start)
        else:
            images = generator.sample(len(batch), steps=steps, prompts=batch, seed=batch_seed(seed, b),
                                      batch_size=batch_size)
        scores.append(scorer(images, batch).cpu())
    s = torch.cat(scores).double()
    return {"clip_score": float(s.mean()), "clip_score_std": float(s.std()) if len(s) > 1 else 0.0,
            "num_samples": len(s), "steps": steps, "nfe": generator.nfe(steps), "seed": seed,
            "seeding": "per-sample" if per_sample else "per-batch", "batch_size": batch_size,
            "recipe": scorer.recipe, "wall_seconds": time.perf_counter() - t_start}
