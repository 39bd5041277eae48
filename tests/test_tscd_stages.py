"""TSCD keeps every stage's student (``RUN/stages/steps-K``), and ``--steps K`` samples the K-segment one.

One tiny progressive run (8 -> 4 -> 2 -> 1 segments, two steps per stage, 8-px digits teacher) through the
training loop, then: the stage artefacts are written at each switch with the weights the stage ended with
and reload bit-exactly; ``load_generator`` / ``sample`` / ``export`` with ``steps=K`` pick the K-segment
student; the levels a loaded stage student samples at are exactly the edges its stage trained towards; a
killed and resumed run ends with the same stage students.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from diffdistill.artefact import load_artefact, read_spec, select_artefact, stage_artefacts
from diffdistill.checkpoint_io import load_safetensors
from diffdistill.generator import load_generator

STAGES = {8: 2, 4: 4, 2: 6, 1: 8}  # segments -> the step its stage ends (stage_starts 0, 2, 4, 6; 8 steps)


def _cfg(teacher, out, *extra):
    from diffdistill.config import load_config
    from diffdistill.paths import resolve_path

    return load_config(resolve_path("configs/digits/tscd.yaml"), [
        f"output_dir={out}", f"teacher.path={teacher}", "data.resolution=8", "train.steps=8",
        "tscd.stage_starts=[0,2,4,6]", "train.batch_size=4", "train.checkpoint_every=2", "train.keep_checkpoints=0",
        "train.sample_every=0", "train.log_every=1", "train.warmup_steps=0", "train.lr=1e-3",
        "tscd.consistency_param=false", *extra])


@pytest.fixture(scope="module")
def run(tiny_teacher_run, tmp_path_factory):
    from diffdistill.training.loop import train

    out = tmp_path_factory.mktemp("tscd") / "run"
    return train(_cfg(tiny_teacher_run, out)), tiny_teacher_run


def _state(folder):
    return load_safetensors(folder / "student.safetensors")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stage_students_are_written_at_each_switch_and_reload_bit_exactly(run):
    run, _ = run
    stages = stage_artefacts(run)
    assert sorted(stages) == [1, 2, 4, 8]
    for k, end in STAGES.items():
        folder = stages[k]
        assert folder == run / "stages" / f"steps-{k}"
        spec = read_spec(folder)
        assert (spec["step"], spec["segments"], spec["members"][0]["renoise"]) == (end, k, "ddim")
        # written before the switch: the weights the stage ended with = the student artefact of the checkpoint
        # at that step (the config's evaluation EMA), not the next stage's
        ck = run / "checkpoints" / f"step-{end:07d}"
        assert _same(_state(folder), load_safetensors(ck / "student" / "student.safetensors"))
        # reloads bit-exactly: the loaded network holds exactly the saved tensors
        net = load_artefact(folder).model.net
        assert _same({n: t.detach() for n, t in net.state_dict().items()}, _state(folder))
    # the stages differ (each trained on), and no stray temporary folders are left
    assert not _same(_state(stages[8]), _state(stages[4]))
    assert sorted(p.name for p in (run / "stages").iterdir()) == ["steps-1", "steps-2", "steps-4", "steps-8"]


def test_steps_k_picks_the_k_segment_student(run, capsys):
    from diffdistill.cli import main

    run, _ = run
    for k in STAGES:
        gen = load_generator(run, device="cpu", steps=k)
        assert gen.artefact == run / "stages" / f"steps-{k}" and gen.default_steps == k
        assert f"using the {k}-step stage student {run / 'stages' / f'steps-{k}'}" in capsys.readouterr().out
    # no steps: the latest checkpoint's student (the last stage), and nothing printed
    gen = load_generator(run, device="cpu")
    assert gen.artefact == run / "checkpoints" / "step-0000008" / "student" and capsys.readouterr().out == ""
    # no stage with 3 segments: the latest student, regridded, says so
    gen = load_generator(run, device="cpu", steps=3)
    assert gen.artefact == run / "checkpoints" / "step-0000008" / "student"
    assert "no stage student with 3 steps" in capsys.readouterr().out
    # a checkpoint folder sees only the stages that had ended by its step (steps-2 is written at step 6)
    ck = run / "checkpoints" / "step-0000004"
    assert sorted(stage_artefacts(ck)) == [4, 8]
    assert select_artefact(ck, 4)[0] == run / "stages" / "steps-4"
    assert select_artefact(ck, 2)[0] == ck / "student"
    # the command line says which student it sampled
    assert main(["sample", "--checkpoint", str(run), "--steps", "2", "--num-samples", "3",
                 "--out", str(run.parent / "samples")]) == 0
    assert f"using the 2-step stage student {run / 'stages' / 'steps-2'}" in capsys.readouterr().out


def test_export_steps_k_exports_that_stage_student(run, tmp_path):
    from diffdistill.export import export_generator

    run, _ = run
    for k in (4, 2):
        exp = export_generator(str(run), str(tmp_path / f"exp{k}"), steps=k)
        levels = json.loads((exp / "diffdistill.json").read_text())["student"]["levels"]
        assert levels == read_spec(run / "stages" / f"steps-{k}")["members"][0]["levels"]
        ours = load_generator(run, device="cpu", steps=k).sample(4, seed=3)
        theirs = load_generator(exp, device="cpu").sample(4, seed=3)
        assert (ours - theirs).abs().max().item() < 1e-4


def test_sampling_levels_are_the_edges_each_stage_trained_towards(run, monkeypatch):
    """Record the (level, edge) jumps of the student's prediction in training, stage by stage, and compare
    them with the jumps a loaded stage student makes: levels[i] -> levels[i + 1] (DDIM), the last to the
    boundary t_0."""
    _assert_sampling_levels_are_trained_edges(run[0], monkeypatch)


def _assert_sampling_levels_are_trained_edges(run, monkeypatch) -> None:
    from diffdistill.config import load_config
    from diffdistill.methods import consistency_distillation as cdm
    from diffdistill.methods.base import Batch
    from diffdistill.training.build import build_method

    cfg = load_config(run / "config.yaml")
    method, _ = build_method(cfg, "cpu")
    jumps: list[tuple[float, float]] = []
    real = cdm.ddim_jump

    def recording(x, x0, sigma, sigma_to):
        if x0.requires_grad:  # the student's prediction (targets are computed without a graph)
            jumps.extend(zip(sigma.tolist(), sigma_to.tolist()))
        return real(x, x0, sigma, sigma_to)

    monkeypatch.setattr(cdm, "ddim_jump", recording)
    images = torch.rand(512, 1, 8, 8) * 2 - 1
    labels = torch.arange(512) % 10
    bottom = float(method.grid[0])
    for stage, (k, end) in enumerate(STAGES.items()):
        jumps.clear()
        method.train_step(Batch(images, labels, torch.Generator().manual_seed(stage), 512), end - 1)
        assert method.stage == stage
        trained = set(jumps)
        levels = load_generator(run, device="cpu", steps=k).model.levels_for(k)
        assert len(levels) == k and levels == method.student.levels
        sampled = list(zip(levels, levels[1:] + [bottom]))
        assert all(j in trained for j in sampled), (sampled, sorted(trained))
        # every edge training jumps to is a sampling level (or the boundary), and every level is a segment top
        assert {e for _, e in trained} == set(levels[1:]) | {bottom}
        assert max(s for s, _ in trained) == levels[0]


@pytest.fixture(scope="module", params=["tscd.grid=geometric", "the shipped config: tscd.edges=geometric"])
def geometric_run(request, tiny_teacher_run, tmp_path_factory):
    from diffdistill.training.loop import train

    if request.param.startswith("the shipped config"):
        run, _ = request.getfixturevalue("run")
        assert read_spec(run / "stages" / "steps-4")  # the shipped digits config moves the edges
        return run
    return train(_cfg(tiny_teacher_run, tmp_path_factory.mktemp("tscd_geo") / "run", request.param))


def test_uniform_edges_are_the_teachers_trailing_timesteps_and_export_as_ddim(tiny_teacher_run, tmp_path, monkeypatch):
    """``edges: uniform`` (PCM / Hyper-SD): stage k's levels are every N/k-th level of the teacher's trailing
    grid, training jumps to exactly those, and the export is diffusers' DDIM with trailing spacing, same samples."""
    from diffusers import DDIMScheduler

    from diffdistill.export import export_generator
    from diffdistill.training.loop import train

    run = train(_cfg(tiny_teacher_run, tmp_path / "run", "tscd.edges=uniform"))
    _assert_sampling_levels_are_trained_edges(run, monkeypatch)
    for k in (4, 2):
        levels = read_spec(run / "stages" / f"steps-{k}")["members"][0]["levels"]
        exp = export_generator(str(run), str(tmp_path / f"exp{k}"), steps=k)
        sched = DDIMScheduler.from_pretrained(exp, subfolder="scheduler")
        assert sched.config.timestep_spacing == "trailing"
        sched.set_timesteps(k)
        t = sched.timesteps.tolist()
        assert t == [999 - j * 1000 // k for j in range(k)] or t == [round(1000 - j * 1000 / k) - 1 for j in range(k)], t
        ours = load_generator(run, device="cpu", steps=k).sample(4, seed=3)
        theirs = load_generator(exp, device="cpu").sample(4, seed=3)
        assert len(levels) == k and (ours - theirs).abs().max().item() < 1e-4


def test_a_geometric_grid_trains_samples_and_exports_on_the_same_levels(geometric_run, monkeypatch, tmp_path):
    """``grid: geometric`` (uniform in log-SNR) or ``edges: geometric`` (the teacher's grid, edges moved):
    every stage's levels are geometric from the teacher's top level, training jumps to exactly those levels,
    and ``export --steps K`` reproduces them with diffusers' Euler scheduler (exponential sigmas) and the
    same samples."""
    from diffusers import EulerDiscreteScheduler

    from diffdistill.export import export_generator

    run = geometric_run
    _assert_sampling_levels_are_trained_edges(run, monkeypatch)
    top = None
    for k in (8, 4, 2):
        levels = read_spec(run / "stages" / f"steps-{k}")["members"][0]["levels"]
        top = top or levels[0]
        assert levels[0] == top and len(levels) == k
        ratios = [b / a for a, b in zip(levels, levels[1:])]
        assert max(ratios) - min(ratios) < 1e-5 * max(ratios), (k, levels)  # a geometric sequence
        exp = export_generator(str(run), str(tmp_path / f"exp{k}"), steps=k)
        sched = EulerDiscreteScheduler.from_pretrained(exp, subfolder="scheduler")
        assert sched.config.use_exponential_sigmas or k == 2  # two levels are also a Karras grid
        sched.set_timesteps(k)
        assert torch.allclose(sched.sigmas[:-1].double(), torch.tensor(levels, dtype=torch.float64), rtol=1e-4)
        ours = load_generator(run, device="cpu", steps=k).sample(4, seed=3)
        theirs = load_generator(exp, device="cpu").sample(4, seed=3)
        assert (ours - theirs).abs().max().item() < 1e-4


def test_a_geometric_grid_outside_the_teachers_levels_is_one_clear_error(run, tmp_path):
    from diffdistill.errors import UserError
    from diffdistill.training.build import build_method

    _, teacher = run
    for extra, message in ((["tscd.sigma_min=2.0", "tscd.sigma_max=1.0"], "tscd.sigma_min (2) must be below tscd.sigma_max (1)"),
                           (["tscd.sigma_max=1000"], "must lie within the teacher's levels")):
        with pytest.raises(UserError, match=re.escape(message)):
            build_method(_cfg(teacher, tmp_path / "run", "tscd.grid=geometric", *extra), "cpu")
    assert not (tmp_path / "run").exists()


def test_geometric_edges_keep_the_grids_spacing_inside_each_segment():
    """``edges: geometric``: stage k's edges (levels jN/k) are geometric on the grid's range; between two
    edges the N/k levels are at equal steps of the grid's fractional index (the grid's own spacing); uniform
    edges, one segment, or a grid that is geometric already leave the levels as they are."""
    import math

    from diffdistill.methods.consistency_distillation import TSCD

    n, lo, hi = 48, 0.01, 160.0
    grid = torch.tensor([lo * (hi / lo) ** ((i / n) ** 0.7) for i in range(n + 1)])  # not geometric itself
    log_g = grid.double().log()

    def index(v: float) -> float:
        i = min(max(int(torch.searchsorted(log_g, torch.tensor(math.log(v), dtype=torch.float64))), 1), n)
        return i - 1 + (math.log(v) - log_g[i - 1].item()) / (log_g[i] - log_g[i - 1]).item()

    assert TSCD._stage_grid(grid, 4, "uniform") is grid and TSCD._stage_grid(grid, 1, "geometric") is grid
    for k in (2, 4, 8):
        g = TSCD._stage_grid(grid, k, "geometric").double()
        assert g.shape == grid.shape and bool((g[1:] > g[:-1]).all())
        edges = g[:: n // k]
        want = torch.tensor([lo * (hi / lo) ** (j / k) for j in range(k + 1)], dtype=torch.float64)
        assert torch.allclose(edges, want, rtol=1e-6), (k, edges, want)
        # fractional index of a level on the (log-linear) grid: equal steps inside each segment
        for j in range(k):
            u = [index(float(v)) for v in g[j * n // k: (j + 1) * n // k + 1]]
            steps = [b - a for a, b in zip(u, u[1:])]
            assert max(steps) - min(steps) < 1e-4 * max(steps), (k, j, steps)
    # a grid that is geometric already: its geometric edges are its own levels, nothing moves
    geo = torch.tensor([lo * (hi / lo) ** (i / n) for i in range(n + 1)], dtype=torch.float64)
    assert torch.allclose(TSCD._stage_grid(geo.float(), 4, "geometric").double(), geo, rtol=1e-5)


def test_geometric_edges_with_the_previous_stage_as_teacher_is_one_clear_error(run, tmp_path):
    from diffdistill.errors import UserError
    from diffdistill.training.build import build_method

    _, teacher = run
    with pytest.raises(UserError, match="edges=geometric moves each stage's solver levels.*stage_teacher to teacher"):
        build_method(_cfg(teacher, tmp_path / "run", "tscd.edges=geometric", "tscd.stage_teacher=previous"), "cpu")
    assert not (tmp_path / "run").exists()


def test_a_killed_and_resumed_run_keeps_the_same_stage_students(run, tmp_path):
    from diffdistill.training.loop import train

    run, teacher = run
    # checkpoints every 3 steps: killed at step 5, after stages 8 (step 2) and 4 (step 4) were kept, resumed
    # from step 3: steps-4 (written after that checkpoint) is rewritten by the replayed steps
    cfg = _cfg(teacher, tmp_path / "run", "train.checkpoint_every=3")
    train(cfg, stop_after=5)
    assert sorted(stage_artefacts(tmp_path / "run")) == [4, 8]
    kept = _state(tmp_path / "run" / "stages" / "steps-8")
    (tmp_path / "run" / "stages" / ".steps-2.tmp-1").mkdir()  # a write killed half-way
    train(cfg, resume=True)
    assert _same(kept, _state(tmp_path / "run" / "stages" / "steps-8"))
    for k in STAGES:
        assert _same(_state(run / "stages" / f"steps-{k}"), _state(tmp_path / "run" / "stages" / f"steps-{k}")), k
    assert sorted(p.name for p in (tmp_path / "run" / "stages").iterdir()) == [
        "steps-1", "steps-2", "steps-4", "steps-8"]


def test_a_fresh_run_in_a_folder_with_old_stage_students_removes_them(run, tmp_path):
    from diffdistill.training.loop import train

    run, teacher = run
    out = tmp_path / "run"
    shutil.copytree(run / "stages", out / "stages")  # stages of an abandoned run, no checkpoints
    train(_cfg(teacher, out, "train.steps=3", "tscd.stage_starts=[0,1,2,3]"))
    spec = {k: read_spec(d) for k, d in stage_artefacts(out).items()}
    assert sorted(spec) == [2, 4, 8] and all(s["step"] <= 3 for s in spec.values())


def _fresh_noise_student(teacher, out):
    """A 2-step CD run (CM's multistep sampling: fresh noise between steps), trained for one step."""
    from diffdistill.config import load_config
    from diffdistill.paths import resolve_path
    from diffdistill.training.loop import train

    return train(load_config(resolve_path("configs/digits/cd.yaml"), [
        f"output_dir={out}", f"teacher.path={teacher}", "data.resolution=8", "train.steps=1", "student.steps=2",
        "train.batch_size=4", "train.checkpoint_every=1", "train.sample_every=0", "train.warmup_steps=0"]))


def test_gamma_samples_a_stage_student_with_tcd_and_bad_uses_are_refused(run, tmp_path, capsys):
    """``sample --gamma G``: the 4-step stage student sampled with TCD's stochastic steps (other samples than
    DDIM's; gamma 0 is DDIM itself, byte for byte); a gamma outside [0, 1], a teacher and a fresh-noise student
    are refused with one line and exit status 2, writing nothing."""
    from PIL import Image

    from diffdistill.cli import main

    run, teacher_run = run
    outs = {}
    for name, extra in (("ddim", []), ("g0", ["--gamma", "0"]), ("g5", ["--gamma", "0.5"])):
        out = tmp_path / name
        assert main(["sample", "--checkpoint", str(run), "--steps", "4", "--num-samples", "4", "--seed", "3",
                     "--out", str(out), *extra]) == 0
        outs[name] = [torch.tensor(list(Image.open(out / f"{i:06d}.png").getdata())) for i in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(outs["ddim"], outs["g0"]))
    assert not all(torch.equal(a, b) for a, b in zip(outs["ddim"], outs["g5"]))
    bad = [([str(run), "--steps", "4", "--gamma", "1.5"], "--gamma must be in [0, 1]"),
           ([str(teacher_run / "teacher"), "--steps", "4", "--gamma", "0.3"], "a teacher is sampled by its ODE"),
           ([str(_fresh_noise_student(teacher_run, tmp_path / "cd")), "--gamma", "0.3"],
            "re-noises with fresh noise at every step already")]
    capsys.readouterr()
    for args, message in bad:
        out = tmp_path / "bad"
        assert main(["sample", "--checkpoint", *args, "--num-samples", "2", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not out.exists()
