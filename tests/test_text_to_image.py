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

from .test_metrics_eval import tiny_clip  # noqa: F401 (fixture)
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


def test_sample_and_eval_take_a_guidance_scale_for_teachers_only(pipelines, tmp_path, capsys):
    from diffdistill.cli import main

    (tmp_path / "p.txt").write_text("a cat\nzebra\n")
    base = ["sample", "--checkpoint", str(pipelines / "sd"), "--num-samples", "2", "--steps", "2",
            "--prompts", str(tmp_path / "p.txt")]
    outs = {}
    for w in ("1", "4"):
        assert main(base + ["--out", str(tmp_path / w), "--guidance-scale", w]) == 0
        outs[w] = np.asarray(Image.open(tmp_path / w / "000000.png"), dtype=np.float32)
    assert np.abs(outs["1"] - outs["4"]).max() > 0  # guidance changes the teacher's samples
    run = train(_config(pipelines, tmp_path / "run", "tscd"))
    capsys.readouterr()
    cases = [(base[:2] + [str(run)] + base[3:] + ["--out", str(tmp_path / "s"), "--guidance-scale", "2"],
              "--guidance-scale applies to teachers"),
             (base[:-2] + ["--out", str(tmp_path / "t"), "--guidance-scale", "2"], "needs --prompts"),
             (base + ["--out", str(tmp_path / "u"), "--guidance-scale", "-1"], "must be >= 0"),
             (["eval", "fid", "--checkpoint", str(run), "--num-samples", "4", "--out", str(tmp_path / "f.json"),
               "--guidance-scale", "3"], "--guidance-scale applies to teachers")]
    for argv, message in cases:
        assert main(argv) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
        assert len(errors) == 1 and message in errors[0], (argv, errors)


# ------------------------------------------------------------------------------------------------
# The published recipes, on tiny pipelines
def _recipe(pipelines, config, out, teacher, *more):
    return load_config(REPO / config, [
        f"output_dir={out}", f"teacher.path={pipelines / teacher}", "data.resolution=16", "train.steps=2",
        "train.batch_size=2", "train.checkpoint_every=2", "train.sample_every=0", "train.log_every=1",
        "train.mixed_precision=no", "train.warmup_steps=0", *more])


def test_sd15_dmd2_two_stages_stage_two_starts_from_stage_one_with_the_gan(pipelines, tmp_path):
    from diffdistill.training.build import build_method
    from diffdistill.training.loop import init_from

    (tmp_path / "prompts.txt").write_text("\n".join(CAPTIONS) + "\n")
    s1 = _recipe(pipelines, "configs/sd15/dmd2.yaml", tmp_path / "s1", "sd", f"data.path={tmp_path / 'prompts.txt'}",
                 "dmd2.dfake_gen_update_ratio=1")
    assert (s1.train.lr, s1.method_config.gan) == (1e-5, False)
    stage1 = train(s1)
    s2 = _recipe(pipelines, "configs/sd15/dmd2_stage2.yaml", tmp_path / "s2", "sd", f"data.path={pipelines / 'data'}",
                 f"train.init_from={stage1}", "dmd2.dfake_gen_update_ratio=1")
    assert (s2.train.lr, s2.method_config.gan, s2.method_config.gan_gen_weight) == (5e-7, True, 1e-3)
    method, _ = build_method(s2)
    ck = init_from(s2.train.init_from, method)
    for name in ("student", "fake_score"):
        saved = load_file(str(ck / f"{name}.safetensors"))
        assert all(torch.equal(saved[k], v) for k, v in method.nets[name].state_dict().items())
    stage2 = train(s2)
    head = load_file(str(sorted((stage2 / "checkpoints").iterdir())[-1] / "gan_head.safetensors"))
    assert head  # the GAN head exists and was trained from real captioned latents
    with pytest.raises(UserError, match="holds no checkpoint"):
        init_from(str(tmp_path / "nowhere"), method)


def test_sdxl_four_step_dmd2_recipe_trains_with_the_gan_on_captioned_latents(pipelines, tmp_path):
    cfg = _recipe(pipelines, "configs/sdxl/dmd2_4step.yaml", tmp_path / "run", "sdxl", f"data.path={pipelines / 'data'}",
                  "dmd2.dfake_gen_update_ratio=1")
    assert cfg.method_config.gan and cfg.method_config.gan_gen_weight == 5e-3 and cfg.student.steps == 4
    run = train(cfg)
    spec = json.loads((sorted((run / "checkpoints").iterdir())[-1] / "student" / "student.json").read_text())
    assert len(spec["members"][0]["levels"]) == 4 and spec["text"] and spec["latent"]


def test_eval_clip_scores_a_text_student(pipelines, tmp_path, tiny_clip):
    from diffdistill.cli import main

    config, weights, _ = tiny_clip
    run = train(_config(pipelines, tmp_path / "run", "dmd2"))
    (tmp_path / "p.txt").write_text("a cat\nzebra\nabc\n")
    out = tmp_path / "clip.json"
    assert main(["eval", "clip", "--checkpoint", str(run), "--prompts", str(tmp_path / "p.txt"), "--out", str(out),
                 "--clip-model", str(config), "--clip-weights", str(weights), "--batch-size", "2"]) == 0
    result = json.loads(out.read_text())
    assert result["num_samples"] == 3 and 0 <= result["clip_score"] <= 1 and result["nfe"] == 1


def test_cached_latents_equal_per_batch_encoding_and_are_keyed_by_content(pipelines, tmp_path, monkeypatch):
    from diffdistill.data.latents import cached_latents, latent_key
    from diffdistill.training.batches import BatchSource
    from diffdistill.training.build import build_method

    monkeypatch.setenv("DIFFDISTILL_CACHE", str(tmp_path / "cache"))
    cfg = _config(pipelines, tmp_path / "run", "dmd2", "sd", "data", "data.cache_latents=true")
    _, teacher = build_method(cfg)
    ds = build_dataset(cfg.data)
    latents = cached_latents(ds, teacher, torch.device("cpu"))
    assert len(list((tmp_path / "cache").iterdir())) == 1
    plain = BatchSource(ds, teacher, None, 4, 0, 1, 0, torch.device("cpu"))(3)
    cached = BatchSource(ds, teacher, None, 4, 0, 1, 0, torch.device("cpu"), latents=latents)(3)
    assert torch.allclose(plain.images, cached.images, atol=1e-5)
    assert torch.equal(plain.cond.embeds, cached.cond.embeds)
    assert torch.equal(cached_latents(ds, teacher, torch.device("cpu")), latents)  # read back from the cache
    key = latent_key(ds, teacher)
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(tmp_path / "zero.png")
    (tmp_path / "zero.png").replace(ds.files[0])  # one image changes: another key
    try:
        assert latent_key(ds, teacher) != key
    finally:
        _images(pipelines / "data", 1)  # restore the fixture's first image
    assert latent_key(ds, teacher) == key
    run = train(cfg)  # the loop reads the same cache (no second file)
    assert _lora_moved(run) > 0 and len(list((tmp_path / "cache").iterdir())) == 1
