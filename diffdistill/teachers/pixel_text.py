"""Pixel-space text-to-image teachers trained by the project: tokenizer, trainee network, pipeline folder.

The embedded text teacher (``assets/teachers/digits_text``) is a diffusers ``UNet2DConditionModel`` on
16 px one-channel digits, cross-attending to a small ``transformers.CLIPTextModel`` trained with it
(``diffdistill teacher train --config configs/digits_text/teacher.yaml``, see :mod:`diffdistill.methods.dsm_text`).
No VAE: the denoiser works on pixels. It is saved as a pipeline folder that :func:`load_teacher` reads
like a Stable Diffusion folder without ``vae/``::

    model_index.json   {"_class_name": "DiffDistillPixelTextPipeline", "unet": [...], "text_encoder": [...],
                        "tokenizer": [...], "scheduler": [...]}  (no "vae": pixel space)
    unet/              UNet2DConditionModel (config.json + diffusion_pytorch_model.safetensors)
    text_encoder/      CLIPTextModel (config.json + model.safetensors)
    tokenizer/         CLIPTokenizer (vocab.json + merges.txt)
    scheduler/         DDPMScheduler
    diffdistill.json   metadata (data, phrasings, how it was trained)

Each component loads with plain ``from_pretrained(folder, subfolder=...)``; there is no diffusers pipeline
class for pixel-space text-to-image, so ``DiffusionPipeline.from_pretrained`` does not load the folder.

The tokenizer is CLIP's BPE (lower-casing, one token per digit numeral) over a vocabulary built here, no
download: every byte (alone and word-final) plus merges learned by byte-pair encoding on a fixed list of
English words, so each listed word is one token and any other word falls back to smaller pieces (down
to single letters): an unseen phrasing always tokenizes into known tokens, never into "unknown".
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from ..denoiser import Cond, Denoiser, TextCond

PIPELINE_CLASS = "DiffDistillPixelTextPipeline"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# General words for short image descriptions. The tokenizer also gets the words of the training captions
# (diffdistill.data.digits_text); words outside both fall back to sub-word pieces.
GENERAL_WORDS = (
    "a an the this that these those it is are was be of in on at by for from to with without and or not "
    "no yes as into over under above below near its their my your our some any each every all one two three "
    "four five six seven eight nine ten zero eleven twelve number numbers numeral digit digits figure symbol "
    "character letter sign count amount value image images picture pictures photo photograph drawing drawings "
    "sketch painting illustration scan render rendering view shot portrait icon graphic art style sample "
    "hand handwritten handwriting written write writing wrote drawn draw drew drawing paint painted sketched "
    "show shows showing shown depict depicts depicting depicted make made create created generate "
    "generated please small large big tiny little huge black white grey gray dark light bright bold thin thick "
    "neat messy clean clear blurry sharp simple plain single old new round curved straight pen pencil ink "
    "paper chalk marker board page low high resolution pixel pixels centered center left right top bottom "
    "upside down quick careful kid child person someone very quite"
).split()


def bpe_vocabulary(words: Sequence[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """``(vocab, merges)`` of a CLIP BPE tokenizer whose merges make every word of ``words`` one token.

    Merges are learned by byte-pair encoding on ``words`` (each counted once; most frequent pair first,
    ties broken alphabetically), merging until every word is a single symbol. CLIP's encoder applies them
    in the same order, so it reproduces the learned segmentation: each word is one token.
    """
    from tokenizers.pre_tokenizers import ByteLevel

    byte_chars = sorted(ByteLevel.alphabet())  # the 256 characters byte-level BPE maps bytes to
    symbols = byte_chars + [c + "</w>" for c in byte_chars]
    corpus = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in sorted(set(w.lower() for w in words)) if w]
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter = Counter()
        for word in corpus:
            for pair in zip(word, word[1:]):
                pairs[pair] += 1
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        symbols.append(joined)
        new_corpus = []
        for word in corpus:  # merge left to right, as CLIPTokenizer.bpe does
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_corpus.append(tuple(out))
        corpus = new_corpus
    vocab: dict[str, int] = {}
    for s in symbols + [BOS, EOS]:
        vocab.setdefault(s, len(vocab))
    return vocab, merges


def build_tokenizer(folder: str | os.PathLike, words: Sequence[str], max_length: int = 24):
    """Write a CLIP tokenizer (vocab.json + merges.txt + configs) for ``words`` into ``folder`` and load it."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = bpe_vocabulary(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": int(max_length), "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS,
         "tokenizer_class": "CLIPTokenizer"}, indent=2))
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def text_encoder_config(tokenizer: Any, **overrides: Any):
    """A ``CLIPTextConfig`` sized for ``tokenizer`` (vocabulary, special tokens, max length) + ``overrides``."""
    from transformers import CLIPTextConfig

    kwargs = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                  projection_dim=64, hidden_act="quick_gelu")
    kwargs.update(overrides)
    kwargs.update(vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    return CLIPTextConfig(**kwargs)


def tokenize(tokenizer: Any, prompts: Sequence[str]) -> Tensor:
    """``[B, L]`` token ids, padded to the tokenizer's length as Stable Diffusion pipelines do."""
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


class TextTeacherNet(Denoiser):
    """The network trained by text-teacher training: a text-conditional ``VPUNetDenoiser`` and its text encoder.

    ``cond`` is ``[B, L]`` token ids (encoded here, with gradients when the encoder trains), a
    :class:`TextCond` (already encoded) or ``None`` (the empty prompt). ``num_classes`` is the class count
    of the data (the loop then hands the method labels, which it turns into phrasings); the denoiser
    itself has no class input.
    """

    def __init__(self, den: Denoiser, text_encoder: nn.Module, null_ids: Tensor, num_classes: Optional[int]) -> None:
        super().__init__(den.sample_shape, den.sigma_min, den.sigma_max, den.sigma_data, num_classes, den.sigmas)
        self.den = den
        self.text_encoder = text_encoder
        self.register_buffer("null_ids", null_ids.long().reshape(1, -1), persistent=False)

    def encode_ids(self, ids: Tensor) -> TextCond:
        return TextCond(self.text_encoder(ids.to(self.null_ids.device)).last_hidden_state.float())

    def denoise(self, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        if cond is None:
            cond = self.null_ids.expand(x.shape[0], -1)
        if isinstance(cond, Tensor):
            if cond.ndim != 2:
                raise ValueError("TextTeacherNet takes token ids [B, L], a TextCond or None")
            cond = self.encode_ids(cond)
        return self.den(x, sigma, cond)

    @torch.no_grad()
    def sampling_denoiser(self) -> Denoiser:
        """The text-conditional denoiser alone, its empty-prompt encoding set from the current encoder."""
        self.den.null_text = self.encode_ids(self.null_ids)
        return self.den


def save_pixel_text_teacher(unet: nn.Module, text_encoder: nn.Module, tokenizer: Any, scheduler: Any,
                            folder: str | os.PathLike, meta: dict) -> Path:
    """Write the pipeline folder of the module docstring atomically (temporary folder renamed into place)."""
    import diffusers

    from ..paths import atomic_folder
    from .loader import META_FILE

    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        unet.save_pretrained(str(tmp / "unet"), safe_serialization=True)
        text_encoder.save_pretrained(str(tmp / "text_encoder"), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:  # vocab.json + merges.txt too, for slow (Python) CLIPTokenizer readers
            backend.model.save(str(tmp / "tokenizer"))
        scheduler.save_pretrained(str(tmp / "scheduler"))
        index = {"_class_name": PIPELINE_CLASS, "_diffusers_version": diffusers.__version__,
                 "unet": ["diffusers", type(unet).__name__],
                 "text_encoder": ["transformers", type(text_encoder).__name__],
                 "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", type(scheduler).__name__]}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return folder
