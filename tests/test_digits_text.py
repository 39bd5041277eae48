"""The embedded digits text-to-image teacher: captions, tokenizer, pipeline folder, teacher training,
and the prompted class accuracy (issue #14)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from diffdistill.config import load_config
from diffdistill.data import build_dataset
from diffdistill.data.digits_text import HELDOUT_TEMPLATES, TRAIN_TEMPLATES, class_phrasings
from diffdistill.denoiser import TextCond
from diffdistill.errors import UserError
from diffdistill.metrics import prompted_class_accuracy
from diffdistill.metrics.text_digits import class_prompts
from diffdistill.paths import resolve_path
from diffdistill.teachers import load_teacher
from diffdistill.teachers.pixel_text import GENERAL_WORDS, build_tokenizer

SHIPPED = Path(resolve_path("assets/teachers/digits_text"))
# the trained teacher is not shipped yet (issue #14: its training run was still going when this was committed)
needs_shipped = pytest.mark.skipif(not SHIPPED.is_dir(), reason="assets/teachers/digits_text is not shipped yet")
CONFIGS = Path(resolve_path("configs/digits_text"))


def test_captions_cover_every_image_with_training_phrasings_only():
    data = build_dataset(load_config(CONFIGS / "dmd2.yaml").data)
    train, held = class_phrasings(TRAIN_TEMPLATES), class_phrasings(HELDOUT_TEMPLATES)
    assert len(data.captions) == len(data.labels) == 1797
    assert all(c in train[int(y)] for c, y in zip(data.captions, data.labels))
    assert not {p for row in held for p in row} & {p for row in train for p in row}
    assert len(set(data.captions)) == 160  # every training phrasing of every class is some image's caption
    prompts = (CONFIGS / "train_prompts.txt").read_text().splitlines()
    assert prompts == class_prompts(train)  # the BOOT prompt file: training phrasings only


@needs_shipped
def test_tokenizer_gives_unseen_phrasings_known_tokens(tmp_path):
    tok = build_tokenizer(tmp_path, ["seven", "handwritten", "digit", "a"], max_length=24)
    assert tok.convert_ids_to_tokens(tok("A handwritten SEVEN").input_ids)[1:-1] == ["a</w>", "handwritten</w>",
                                                                                   "seven</w>"]
    pieces = tok.convert_ids_to_tokens(tok("zebra, 7").input_ids)[1:-1]
    assert len(pieces) > 3 and tok.eos_token not in pieces  # an unknown word falls back to pieces, never to unk
    shipped = load_teacher(SHIPPED, with_unet=False).tokenizers[0]
    for row in class_phrasings(HELDOUT_TEMPLATES):
        for phrase in row:
            ids = shipped(phrase).input_ids
            assert shipped.eos_token_id not in ids[1:-1] and len(ids) <= shipped.model_max_length
    for word in ("seven", "handwritten", "numeral", "picture"):
        assert len(shipped(word).input_ids) == 3  # one token per listed word
    assert set(GENERAL_WORDS) >= {"image", "digit", "number"}


@needs_shipped
def test_shipped_teacher_loads_as_a_pixel_text_teacher_and_takes_prompts():
    size = sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file())
    assert size < 6e6
    t = load_teacher(SHIPPED)
    assert t.kind == "sd" and not t.latent and t.vae is None and t.image_shape == (1, 16, 16)
    assert t.denoiser.is_text and t.num_classes is None and t.null_text is not None
    cond = t.encode_prompts(["an image showing a seven", "3"])
    assert isinstance(cond, TextCond) and cond.embeds.shape[0] == 2
    x0 = t.denoiser(torch.randn(2, 1, 16, 16), 2.0, cond)
    assert x0.shape == (2, 1, 16, 16) and torch.isfinite(x0).all()
    assert torch.equal(t.encode_images(x0), x0.float())
    meta = json.loads((SHIPPED / "diffdistill.json").read_text())
    assert meta["train_phrasings"] == class_phrasings(TRAIN_TEMPLATES)


@needs_shipped
def test_text_pipeline_that_names_a_vae_still_needs_it(tmp_path):
    folder = tmp_path / "t"
    shutil.copytree(SHIPPED, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "vae": ["diffusers", "AutoencoderKL"]}))
    with pytest.raises(UserError, match="vae/config.json"):
        load_teacher(folder)


def tiny_teacher_config(tmp_path) -> dict:
    d = yaml.safe_load((CONFIGS / "teacher.yaml").read_text())
    d["output_dir"] = str(tmp_path / "run")
    d["train"].update(steps=2, batch_size=8, checkpoint_every=2, sample_every=0, log_every=1, warmup_steps=0)
    d["dsm"]["text_encoder"] = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                "num_attention_heads": 2}
    d["dsm"]["unet"].update(block_out_channels=[8, 16], norm_num_groups=4, attention_head_dim=2)
    return d


def test_text_teacher_training_writes_a_loadable_pipeline(tmp_path):
    from diffdistill.generator import load_generator
    from diffdistill.training.loop import train

    run = train(load_config(base=tiny_teacher_config(tmp_path)))
    folder = run / "teacher"
    assert json.loads((folder / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert (folder / "tokenizer" / "vocab.json").is_file() and (folder / "tokenizer" / "merges.txt").is_file()
    t = load_teacher(run)
    assert t.kind == "sd" and t.vae is None and t.image_shape == (1, 16, 16)
    gen = load_generator(run)  # the checkpoint's artefact: the UNet, text stack from the run's teacher folder
    images = gen.sample(2, steps=2, prompts=["digit seven written by hand"])
    assert images.shape == (2, 1, 16, 16) and images.abs().max() <= 1
    with pytest.raises(UserError, match="class phrasings"):
        bad = tiny_teacher_config(tmp_path / "b")
        bad["data"] = {"name": "toy2d"}
        train(load_config(base=bad))


class RealDigits:
    """A perfect (or stubborn) text-to-image model: real test-split digits of the requested (or a fixed) class."""

    def __init__(self, phrasings, fixed=None):
        from diffdistill.metrics import load_digits_images

        self.images, self.labels = load_digits_images(split="test")
        self.lookup = {p: c for c, row in enumerate(phrasings) for p in row}
        self.fixed = fixed

    def sample(self, n, steps=None, prompts=None, seed=0, batch_size=None):
        out = []
        for i, p in enumerate(prompts):
            pool = self.images[self.labels == (self.lookup[p] if self.fixed is None else self.fixed)]
            out.append(pool[(seed + i) % len(pool)])
        return torch.stack(out)


def test_prompted_class_accuracy_on_trivial_generators():
    held = class_phrasings(HELDOUT_TEMPLATES)
    good = prompted_class_accuracy(RealDigits(held), held, num_samples=160, batch_size=64, with_fid=True)
    assert good["accuracy"] >= 0.97 and len(good["per_class"]) == 10 and len(good["per_phrasing"]) == 8
    stuck = prompted_class_accuracy(RealDigits(held, fixed=3), held, num_samples=160, batch_size=64, with_fid=True)
    assert stuck["accuracy"] == pytest.approx(0.1, abs=0.02)
    assert stuck["per_class"][3] > 0.9 and stuck["fid"] > good["fid"] + 10
