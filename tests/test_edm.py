"""EDM's networks, the EDM snapshot converter and EDM teachers in DMD2 / iCT.

Parity: the fixtures in ``tests/fixtures/edm`` were made by EDM's own code (NVlabs/edm, outside this
repository) with ``tests/fixtures/edm/make_fixtures.py``: tiny DDPM++, NCSN++, skip-encoder SongUNet and ADM
networks with redrawn weights, their inputs and EDM's outputs, one multi-head ``UNetBlock``, a snapshot pickled
as EDM's training loop pickles it, the same with a poisoned module source, and a malicious pickle.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffdistill.cli import main
from diffdistill.config import load_config
from diffdistill.networks.edm_layers import UNetBlock
from diffdistill.teachers.edm import EDMNetDenoiser, save_edm_folder

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures" / "edm"
MARKER = "EDM_FIXTURE_PWNED"
CASES = json.loads((FIX / "cases.json").read_text())
GPU_CONFIGS = ["imagenet64/dmd2.yaml", "imagenet64/dmd2_stage2.yaml", "imagenet64/msd.yaml",
               "imagenet64/disback.yaml", "cifar10/dmd2.yaml", "cifar10/ict.yaml"]


def _fixture(name: str) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    tensors = load_file(str(FIX / f"{name}.safetensors"))
    return ({k[6:]: v for k, v in tensors.items() if k.startswith("state/")},
            {k[3:]: v for k, v in tensors.items() if k.startswith("io/")})


def _denoiser(case: dict) -> EDMNetDenoiser:
    kw = dict(case)
    network, res, ch = kw.pop("model_type"), kw.pop("img_resolution"), kw.pop("img_channels")
    return EDMNetDenoiser(network, kw, res, ch, kw.pop("label_dim")).eval()


def _label_ids(one_hot: torch.Tensor) -> torch.Tensor:
    """One-hot rows to class ids; a zero row to the null id ``label_dim``."""
    return torch.where(one_hot.sum(1) > 0, one_hot.argmax(1), torch.tensor(one_hot.shape[1]))


# ------------------------------------------------------------------------------------------------
# Parity with EDM's code
@pytest.mark.parametrize("name", ["ddpmpp", "adm"])
def test_networks_match_edm_outputs(name):
    state, io = _fixture(name)
    den = _denoiser(CASES[name])
    den.load_state_dict(state)  # strict: EDM's key names
    with torch.no_grad():
        out = den(io["x"], io["sigma"], io["class_labels"])
        by_id = den(io["x"], io["sigma"], _label_ids(io["class_labels"]))  # class ids, null id = zero vector
    assert (out - io["out"]).abs().max() < 1e-5
    assert (by_id - io["out"]).abs().max() < 1e-5
    assert io["out"].abs().max() > 0.5  # the reference is not trivially zero
    state["model.map_layer0.weight"] += 0.01  # and a changed weight is seen
    den.load_state_dict(state)
    with torch.no_grad():
        assert (den(io["x"], io["sigma"], io["class_labels"]) - io["out"]).abs().max() > 1e-3


def test_multi_head_attention_block_matches_edm():
    state, io = _fixture("block")
    block = UNetBlock(**CASES["block"]["UNetBlock"]).eval()
    block.load_state_dict(state)
    assert block.num_heads == 2
    with torch.no_grad():
        assert (block(io["x"], io["emb"]) - io["out"]).abs().max() < 1e-5


# ------------------------------------------------------------------------------------------------
# The converter
def test_converted_snapshot_matches_edm_and_samples_identically(tmp_path):
    from diffdistill.samplers import heun
    from diffdistill.schedules import karras_sigmas
    from diffdistill.teachers import load_teacher

    out = tmp_path / "teacher"
    assert main(["convert", "edm", str(FIX / "snapshot.pkl"), "--out", str(out)]) == 0
    spec = json.loads((out / "edm.json").read_text())
    assert spec["network"] == "SongUNet" and spec["network_kwargs"]["encoder_type"] == "residual"
    assert spec["source"]["dropped"] == ["model.map_augment.weight"] and spec["network_kwargs"]["augment_dim"] == 0
    assert (spec["sigma_min"], spec["sigma_max"]) == (0.002, 80.0)
    den = load_teacher(out).denoiser
    _, io = _fixture("snapshot")
    with torch.no_grad():
        assert (den(io["x"], io["sigma"], _label_ids(io["class_labels"])) - io["out"]).abs().max() < 1e-5
        sigmas = karras_sigmas(4, 0.002, 80.0)  # EDM's edm_sampler, 4 steps, deterministic
        x = heun(den, io["latents"] * sigmas[0], sigmas, _label_ids(io["sample_labels"])).x
    assert (x - io["heun"]).abs().max() < 1e-4 and io["heun"].abs().max() > 1
    assert main(["sample", "--checkpoint", str(out), "--num-samples", "2", "--steps", "2", "--labels", "3",
                 "--out", str(tmp_path / "samples")]) == 0
    assert (tmp_path / "samples" / "000001.png").is_file()


def test_poisoned_snapshot_converts_without_running_its_source(tmp_path, monkeypatch):
    """EDM's unpickler executes the pickled module source (here: it writes a marker file); ours never does."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "teacher"
    assert main(["convert", "edm", str(FIX / "poisoned.pkl"), "--out", str(out)]) == 0
    assert not (tmp_path / MARKER).exists()
    from diffdistill.teachers import load_teacher

    den = load_teacher(out).denoiser
    _, io = _fixture("songskip")  # the skip encoder / decoder SongUNet
    with torch.no_grad():
        assert (den(io["x"], io["sigma"]) - io["out"]).abs().max() < 1e-5


def test_malicious_pickle_is_refused_in_one_line_and_never_run(tmp_path):
    out = tmp_path / "teacher"
    r = subprocess.run([sys.executable, "-m", "diffdistill", "convert", "edm", str(FIX / "malicious.pkl"), "--out",
                        str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "system" in lines[0] and "refusing" in lines[0], r.stderr
    assert not (tmp_path / MARKER).exists() and not out.exists()


class _Call:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("payload", [_Call(eval, "1 + 1"), _Call(subprocess.call, ["true"]),
                                     _Call(torch.load, "weights.pt")])
def test_any_other_callable_is_refused(tmp_path, payload, capsys):
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps({"ema": payload}))
    assert main(["convert", "edm", str(bad), "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refusing to load" in err[0]
    assert not (tmp_path / "t").exists()


# ------------------------------------------------------------------------------------------------
# DMD2's GAN head on the bottleneck
def test_gan_features_are_the_encoder_output_and_skip_the_decoder():
    from diffdistill.methods.gan_head import bottleneck_features, feature_shape

    den = _denoiser(CASES["adm"])
    calls = []
    den.model.dec[next(iter(den.model.dec))].register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(2, 3, 8, 8)
    feats = bottleneck_features(den, x, torch.tensor([1.0, 2.0]), torch.tensor([0, 4]))
    assert feats.shape[1:] == feature_shape(den) == (8, 4, 4) and not calls
    enc = []
    den.model.enc[list(den.model.enc)[-1]].register_forward_hook(lambda m, i, o: enc.append(o))
    den(x, torch.tensor([1.0, 2.0]), torch.tensor([0, 4]))
    assert torch.equal(enc[-1], feats)


# ------------------------------------------------------------------------------------------------
# Training on EDM teachers (1-channel 8x8 digits)
def _digits(config: str, teacher: Path, out: Path, *more: str):
    return load_config(REPO / "configs" / config, overrides=[
        f"teacher.path={teacher}", f"output_dir={out}", "data.resolution=8", "train.steps=3", "train.batch_size=4",
        "train.checkpoint_every=3", "train.sample_every=0", "train.log_every=1", "train.warmup_steps=0", *more])


def test_dmd2_trains_on_a_converted_edm_teacher(tmp_path):
    from diffdistill.generator import load_generator
    from diffdistill.training.build import build_method
    from diffdistill.training.loop import train

    teacher = tmp_path / "teacher"
    assert main(["convert", "edm", str(FIX / "snapshot.pkl"), "--out", str(teacher)]) == 0
    cfg = _digits("digits/dmd2.yaml", teacher, tmp_path / "run", "dmd2.dropout=0.0", "student.levels=[80.0]")
    method, _ = build_method(cfg)
    grid = method.grid  # the official Karras grid: 1000 levels over [0.002, 80], rho 7, ascending
    assert len(grid) == 1000 and grid[0] == pytest.approx(0.002) and grid[-1] == pytest.approx(80.0)
    assert float(grid[500]) == pytest.approx(((80 ** (1 / 7) + 499 / 999 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7))
    assert "gan_head" in method.nets and method.nets["gan_head"].feature_shape == (8, 4, 4)
    run = train(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all("loss_fake" in r for r in rows) and "loss_dm" in rows[0]
    art = json.loads((run / "checkpoints" / "step-0000003" / "student" / "student.json").read_text())
    assert art["members"][0]["network"]["class"] == "EDMNetDenoiser"
    images = load_generator(run, device="cpu").sample(3, labels=[1, 2, 3], seed=0)
    assert images.shape == (3, 1, 8, 8) and torch.isfinite(images).all()

    from diffdistill.errors import UserError
    from diffdistill.export import export_generator

    with pytest.raises(UserError, match="only diffusers-UNet students"):  # diffusers has no EDM network
        export_generator(run, tmp_path / "export")


def test_ict_trains_an_edm_architecture_from_scratch(tmp_path):
    from diffdistill.errors import UserError
    from diffdistill.generator import load_generator
    from diffdistill.training.build import build_method
    from diffdistill.training.loop import train

    arch = tmp_path / "ncsnpp"
    net = EDMNetDenoiser("SongUNet", dict(model_channels=4, channel_mult=[1, 2], channel_mult_emb=2, num_blocks=1,
                                          attn_resolutions=[4], dropout=0.0, embedding_type="fourier",
                                          channel_mult_noise=2, encoder_type="residual", resample_filter=[1, 3, 3, 1],
                                          fourier_scale=0.02), 8, 1)
    save_edm_folder(net, arch, weights=False)
    assert not (arch / "model.safetensors").exists()
    cfg = _digits("digits/ict.yaml", arch, tmp_path / "run", "ict.dropout=0.3")
    method, _ = build_method(cfg)
    drops = [m.p for m in method.student.net.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(p == 0.3 for p in drops)  # residual blocks only: one per UNetBlock
    assert len(drops) == sum(isinstance(m, UNetBlock) for m in method.student.net.modules())
    assert method.student.net.model.map_noise.freqs.abs().max() < 0.2  # Fourier scale 0.02
    run = train(cfg)
    images = load_generator(run, device="cpu").sample(2, seed=0)
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
    with pytest.raises(UserError, match="architecture only"):  # a distillation method needs trained weights
        build_method(_digits("digits/dmd2.yaml", arch, tmp_path / "dmd2", "data.channels=1"))


def test_small_student_of_an_edm_teacher_round_trips_through_its_spec():
    from diffdistill.artefact import build_network
    from diffdistill.students import build_student_net

    teacher = _denoiser(CASES["ddpmpp"])
    small = build_student_net(teacher, "small", small={"num_blocks": 2, "dropout": 0.1})
    assert isinstance(small, EDMNetDenoiser) and small.network_kwargs["num_blocks"] == 2
    assert sum(p.numel() for p in small.parameters()) > sum(p.numel() for p in teacher.parameters())
    rebuilt = build_network(small.spec())
    rebuilt.load_state_dict(small.state_dict())  # strict: the spec rebuilds the same architecture
    x, s, c = torch.randn(2, 2, 8, 8), torch.tensor([0.5, 5.0]), torch.tensor([0, 3])
    with torch.no_grad():
        assert torch.equal(small.eval()(x, s, c), rebuilt.eval()(x, s, c))


# ------------------------------------------------------------------------------------------------
# The GPU configs
@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_gpu_configs_validate(name):
    cfg = load_config(REPO / "configs" / name)
    section = cfg.method_config
    if cfg.method != "ict":
        assert "edm" in cfg.teacher.path and section.fake_weighting == "edm" and section.dropout == 0.0
        assert (section.grid_levels, section.grid_sigma_min, section.grid_sigma_max, section.grid_rho) == \
            (1000, 0.002, 80.0, 7.0)
        assert cfg.student.levels == [80.0] and cfg.train.mixed_precision == "bf16"
        assert bool(cfg.train.init_from) == ("stage2" in name) and section.gan == ("imagenet64/dmd2.yaml" != name
                                                                                   and "msd" not in name)
    else:
        assert section.dropout == 0.3 and cfg.student.kind == "copy"


def test_full_size_networks_have_edm_parameter_counts():
    """Counted with EDM's own classes (on the meta device): ADM ImageNet-64 and NCSN++ CIFAR-10 at 8 blocks."""
    from diffdistill.paths import resolve_path
    from diffdistill.teachers.edm import build_edm_denoiser, read_edm_json

    with torch.device("meta"):
        adm = EDMNetDenoiser("DhariwalUNet", {"model_channels": 192, "channel_mult": [1, 2, 3, 4]}, 64, 3, 1000)
        ncsnpp = build_edm_denoiser(read_edm_json(Path(resolve_path("assets/teachers/edm-ncsnpp-cifar10"))))
    assert sum(p.numel() for p in adm.parameters()) == 295_899_267
    assert sum(p.numel() for p in ncsnpp.parameters()) == 97_610_499
    assert adm.bottleneck_shape() == (768, 8, 8)  # the official GAN head's 768 channels at 8x8
