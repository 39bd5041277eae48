"""Text-to-image end to end on tiny SD- and SDXL-shaped pipelines: captioned image folders, LoRA students
of every method on a ``UNet2DConditionModel``, the GAN branch on captioned latents, and guidance checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffdistill.config import load_config
from diffdistill.data import build_dataset, training_prompts
from diffdistill.errors import UserError
from diffdistill.training.loop import train

from .test_teachers import sd_pipeline

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = ["a cat", "a cab", "abc", "the bat", "a dog", "zebra", "quiet fox", "ca ca"]


def _images(folder: Path, n: int = len(CAPTIONS), sub: str = "") -> list[str]:
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        name = f"{sub}{i}.png"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / name)
        names.append(name)
    return names


def captioned_folder(folder: Path, style: str = "jsonl") -> Path:
    names = _images(folder)
    if style == "jsonl":
        rows = [json.dumps({"file_name": n, "text": c, "extra": 1}) for n, c in zip(names, CAPTIONS)]
        (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    else:
        for n, c in zip(names, CAPTIONS):
            (folder / n).with_suffix(".txt").write_text(c + "\n")
    return folder


def _data(path: Path):
    return load_config(REPO / "configs/sd15/dmd2.yaml", ["data.name=folder", f"data.path={path}",
                                                          "data.resolution=16"]).data


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    sd_pipeline(root).save_pretrained(root / "sd")
    sd_pipeline(root, sdxl=True).save_pretrained(root / "sdxl")
    captioned_folder(root / "data")
    _images(root / "plain")
    return root


# ------------------------------------------------------------------------------------------------
# Captioned folders
@pytest.mark.parametrize("style", ["jsonl", "txt"])
def test_captioned_folder_pairs_each_image_with_its_caption(tmp_path, style):
    ds = build_dataset(_data(captioned_folder(tmp_path, style)))
    assert [p.name for p in ds.files] == sorted(f"{i}.png" for i in range(len(CAPTIONS)))
    assert ds.captions == [CAPTIONS[int(p.stem)] for p in ds.files]
    assert training_prompts(_data(tmp_path)) == ds.captions


def test_captions_of_class_subfolders_and_plain_folders(tmp_path):
    names = _images(tmp_path, 2, "dogs/") + _images(tmp_path, 2, "cats/")
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": f"t {n}"}) + "\n"
                                                     for n in names))
    ds = build_dataset(_data(tmp_path))
    assert ds.class_names == ["cats", "dogs"] and ds.captions == [f"t {p.relative_to(tmp_path).as_posix()}"
                                                                   for p in ds.files]
    _images(tmp_path / "bare", 2)
    assert build_dataset(_data(tmp_path / "bare")).captions is None


def _bad(folder: Path, case: str) -> str:
    names = _images(folder, 3)
    rows = [{"file_name": n, "text": f"caption {n}"} for n in names]
    if case.startswith("txt"):
        for n in names:
            (folder / n).with_suffix(".txt").write_text(f"caption {n}")
        if case == "txt_missing":
            (folder / "1.txt").unlink()
            return r"image .*1\.png has no caption: the folder uses sidecar captions, so add .*1\.txt"
        if case == "txt_empty":
            (folder / "2.txt").write_text("  \n")
            return r"caption .*2\.txt is empty"
        (folder / "9.txt").write_text("orphan")
        return r"caption .*9\.txt has no image next to it"
    expected = {
        "jsonl_missing": (rows[:2], r"image .*2\.png has no caption in .*metadata\.jsonl"),
        "jsonl_empty": (rows[:2] + [{"file_name": "2.png", "text": ""}], r"line 3 has an empty caption for 2\.png"),
        "jsonl_orphan": (rows + [{"file_name": "7.png", "text": "x"}], r"line 4 names 7\.png, which is not an image"),
        "jsonl_twice": (rows + [rows[0]], r"line 4 captions 0\.png a second time"),
        "jsonl_keys": (rows[:2] + [{"file": "2.png", "text": "x"}], r"line 3 needs \"file_name\" and \"text\" keys"),
    }
    if case == "jsonl_syntax":
        (folder / "metadata.jsonl").write_text(json.dumps(rows[0]) + "\n{oops\n")
        return r"metadata\.jsonl line 2 is not valid JSON"
    lines, message = expected[case]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return message


@pytest.mark.parametrize("case", ["txt_missing", "txt_empty", "txt_orphan", "jsonl_missing", "jsonl_empty",
                                  "jsonl_orphan", "jsonl_twice", "jsonl_keys", "jsonl_syntax"])
def test_every_bad_captioned_folder_is_one_line(tmp_path, case):
    message = _bad(tmp_path, case)
    with pytest.raises(UserError, match=message) as info:
        build_dataset(_data(tmp_path))
    assert "\n" not in str(info.value)


def test_cli_reports_a_bad_captioned_folder_with_exit_2(pipelines, tmp_path, capsys):
    from diffdistill.cli import main

    _bad(tmp_path / "d", "jsonl_orphan")
    code = main(["train", "--config", str(REPO / "configs/sd15/dmd2.yaml"), "--output", str(tmp_path / "run"),
                 "--set", f"teacher.path={pipelines / 'sd'}", "--set", "data.name=folder",
                 "--set", f"data.path={tmp_path / 'd'}", "--set", "data.resolution=16", "--set", "train.steps=1"])
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("error")]  # (model-loading bars aside)
    assert code == 2 and "Traceback" not in err and len(errors) == 1 and "which is not an image" in errors[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------------------------------------------------
# LoRA students of every method on UNet2DConditionModel, trained on captioned latents
CONFIGS = {"dmd2": "configs/sd15/dmd2.yaml", "tscd": "configs/sd15/tscd_lora.yaml", "boot": "configs/sd15/boot.yaml",
           "cd": "configs/digits/cd.yaml", "ict": "configs/digits/ict.yaml", "disback": "configs/sdxl/disback.yaml",
           "msd": "configs/sd15/msd.yaml"}
EXTRA = {"dmd2": ["dmd2.gan=true", "dmd2.dfake_gen_update_ratio=1"],
         "disback": ["disback.degradation_steps=2", "disback.num_nodes=2", "disback.interval=1", "train.steps=4",
                     "train.checkpoint_every=4", "disback.dfake_gen_update_ratio=1"],
         "msd": ["msd.num_students=2", "msd.dfake_gen_update_ratio=1"]}


def _config(pipelines, out, method, teacher="sd", data="data", *more):
    return load_config(REPO / CONFIGS[method], [
        f"output_dir={out}", f"teacher.path={pipelines / teacher}", "data.name=folder",
        f"data.path={pipelines / data}", "data.resolution=16", "data.channels=3", "student.kind=lora",
        "student.lora_rank=4", "train.steps=2", "train.batch_size=4", "train.checkpoint_every=2",
        "train.sample_every=0", "train.log_every=1", "train.mixed_precision=no", "train.warmup_steps=0",
        "train.lr=1e-3", *EXTRA.get(method, []), *more])


def _lora_moved(run: Path) -> float:
    """Largest |lora_B| over the artefact's members: peft starts lora_B at zero, so > 0 means it trained."""
    ckpt = sorted((run / "checkpoints").iterdir())[-1] / "student"
    spec = json.loads((ckpt / "student.json").read_text())
    assert all(m["lora"]["rank"] == 4 for m in spec["members"])
    return max(t.abs().max().item() for m in spec["members"]
               for k, t in load_file(str(ckpt / m["weights"])).items() if "lora_B" in k)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_every_method_trains_a_lora_student_on_a_sd_unet(pipelines, tmp_path, method):
    run = train(_config(pipelines, tmp_path / "run", method))
    assert _lora_moved(run) > 0


@pytest.mark.parametrize("method", ["dmd2", "tscd"])
def test_lora_students_train_on_a_sdxl_unet(pipelines, tmp_path, method):
    run = train(_config(pipelines, tmp_path / "run", method, "sdxl"))
    assert _lora_moved(run) > 0


def test_gan_branch_sees_captioned_latents_and_trains_the_head(pipelines, tmp_path):
    from diffdistill.denoiser import TextCond
    from diffdistill.training.batches import BatchSource
    from diffdistill.training.build import build_method

    cfg = _config(pipelines, tmp_path / "run", "dmd2")
    method, teacher = build_method(cfg)
    ds = build_dataset(cfg.data)
    batch = BatchSource(ds, teacher, None, 4, 0, 1, 0, torch.device("cpu"))(0)
    idx = BatchSource(ds, teacher, None, 4, 0, 1, 0, torch.device("cpu")).global_indices(0, len(ds))
    assert batch.images.shape == (4, 4, 8, 8)  # VAE latents of the real images (scaled)
    assert isinstance(batch.cond, TextCond)
    assert torch.allclose(batch.cond.embeds, teacher.encode_prompts([ds.captions[int(i)] for i in idx]).embeds)
    before = {k: v.clone() for k, v in method.nets["gan_head"].state_dict().items()}
    run = train(cfg)
    after = load_file(str(sorted((run / "checkpoints").iterdir())[-1] / "gan_head.safetensors"))
    assert max((after[k] - before[k]).abs().max().item() for k in before) > 0


# ------------------------------------------------------------------------------------------------
# Guidance
def test_tscd_guidance_changes_what_the_student_learns(pipelines, tmp_path):
    runs = [train(_config(pipelines, tmp_path / f"w{w}", "tscd", "sd", "data", f"tscd.guidance_range=[{w}, {w}]"))
            for w in (1.0, 4.0)]
    states = [load_file(str(sorted((r / "checkpoints").iterdir())[-1] / "student.safetensors")) for r in runs]
    assert max((states[0][k] - states[1][k]).abs().max().item() for k in states[0]) > 1e-6


@pytest.mark.parametrize("method,settings", [("tscd", ["tscd.guidance_range=[3.0, 4.0]"]),
                                             ("dmd2", []),  # the SD1.5 recipe's own guidance 1.75
                                             ("boot", ["teacher.guidance_scale=3.0", "boot.guidance_scale=3.0"])])
def test_guidance_without_conditions_is_an_error(pipelines, tmp_path, method, settings):
    cfg = _config(pipelines, tmp_path / "run", method, "sd", "plain", *settings)
    with pytest.raises(UserError, match=r"guidance is asked for \(.*\) but the text teacher gets no prompts"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unguided_caption_less_folder_still_trains_unconditionally(pipelines, tmp_path):
    cfg = _config(pipelines, tmp_path / "run", "tscd", "sd", "plain", "tscd.guidance_range=null",
                  "tscd.guidance_scale=1.0", "teacher.guidance_scale=1.0")
    assert _lora_moved(train(cfg)) > 0
