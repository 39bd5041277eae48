"""Student artefacts and ``diffdistill export``: every student kind leaves the framework.

Each export is sampled in a subprocess that imports only torch and diffusers (asserted), from the same
initial noise as diffdistill's own sampler, and the two must agree:
- 1e-4 (images in [-1, 1]) where the maths is the same (plain x0 students: DDIM, LCM and Euler schedulers);
- the consistency-parameterised one-step students within the gap bound the export reports (<= 1e-3).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from diffdistill.artefact import load_artefact, save_artefact
from diffdistill.errors import UserError
from diffdistill.export import export_generator
from diffdistill.generator import load_generator
from diffdistill.partitions import PCAPartition, pooled_text_embedding
from diffdistill.schedules import timestep_levels
from diffdistill.seeding import mix_seed
from diffdistill.students import RoutedStudent, Student, build_student_net
from diffdistill.teachers import load_teacher

from .test_teachers import sd_pipeline

DIGITS = str(Path(__file__).resolve().parents[1] / "assets" / "teachers" / "digits")
DIGITS_TEXT = str(Path(__file__).resolve().parents[1] / "assets" / "teachers" / "digits_text")


def _perturb(net: torch.nn.Module, seed: int = 0, scale: float = 0.02) -> None:
    """Move a student's trainable weights off the teacher's so that a wrong load would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def _run_diffusers(script: str, cwd: Path) -> None:
    """Run ``script`` with only torch + diffusers imported; it must not import diffdistill."""
    code = textwrap.dedent(script) + \
        "\nimport sys\nassert not [m for m in sys.modules if m.startswith('diffdistill')]\n"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=cwd, timeout=300)


PIXEL_LOOP = """
import json, torch, diffusers


def sample_export(exp, k, out):
    d = torch.load("in.pt")
    unet = diffusers.UNet2DModel.from_pretrained(exp, subfolder="unet")
    cls = json.load(open(exp + "/scheduler/scheduler_config.json"))["_class_name"]
    sch = getattr(diffusers, cls).from_pretrained(exp, subfolder="scheduler")
    sch.set_timesteps(k)
    g = torch.Generator().manual_seed(5)
    x = d["z"] * sch.init_noise_sigma
    with torch.no_grad():
        for t in sch.timesteps:
            x = sch.step(unet(sch.scale_model_input(x, t), t, class_labels=d["labels"]).sample, t, x,
                         generator=g).prev_sample
    torch.save(x, out)
"""


def _ours(gen, z: torch.Tensor, cond, vp: bool, steps=None) -> torch.Tensor:
    """diffdistill's sample from diffusers' initial latents ``z``: VP schedulers start at ``x_t = z``, i.e.
    sigma-space ``x = z sqrt(1 + s0^2)``; Euler starts at ``x = s0 z`` (init_noise_sigma = s0)."""
    s0 = gen.model.levels_for(steps)[0]
    z = z * (1 + s0**2) ** 0.5 / s0 if vp else z
    with torch.no_grad():
        return gen.model(z, cond, steps=steps, generator=torch.Generator().manual_seed(5))


def _pixel_round_trip(student, tmp_path: Path, info: dict, export_kw=None,
                      tol: float = 1e-5) -> tuple[float, dict, Path]:
    art = tmp_path / "art"
    save_artefact(student, art, {"method": "test", "teacher": DIGITS, "step": 3, **info})
    exp = export_generator(str(art), str(tmp_path / "exp"), **(export_kw or {}))
    gen = load_generator(exp, device="cpu")  # the export, as `diffdistill sample --checkpoint EXPORT` reads it
    k = gen.nfe()
    z = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 3, 5, 7, 9, 1])
    torch.save({"z": z, "labels": labels}, tmp_path / "in.pt")
    _run_diffusers(PIXEL_LOOP + f"sample_export({str(exp)!r}, {k}, 'out.pt')\n", tmp_path)
    theirs = torch.load(tmp_path / "out.pt")
    sched = json.loads((exp / "scheduler" / "scheduler_config.json").read_text())
    vp = sched["_class_name"] != "EulerDiscreteScheduler"
    from_artefact = load_generator(art, device="cpu")
    ours = _ours(from_artefact, z, labels, vp, steps=k)
    diff = (ours - theirs).abs().max().item()
    # the export read back by diffdistill samples like the artefact (consistency students: within the scalings' gap)
    assert (_ours(gen, z, labels, vp) - ours).abs().max().item() < tol
    return diff, sched, exp


@pytest.fixture(scope="module")
def digits():
    return load_teacher(DIGITS).denoiser


@pytest.mark.parametrize("steps,renoise,scheduler", [(1, "fresh", "DDIMScheduler"), (4, "fresh", "LCMScheduler"),
                                                    (2, "ddim", "DDIMScheduler")])
def test_pixel_student_export_matches_diffusers_loop(digits, tmp_path, steps, renoise, scheduler):
    net = build_student_net(digits, "copy")
    _perturb(net)
    student = Student(net, timestep_levels(digits.sigma_grid(), steps), renoise)
    diff, sched, exp = _pixel_round_trip(student, tmp_path, {})
    assert sched["_class_name"] == scheduler
    assert diff < 1e-4
    assert load_generator(exp, device="cpu").nfe() == steps
    index = json.loads((exp / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline"
    card = (exp / "README.md").read_text()
    assert f"set_timesteps({steps})" in card and "null (unconditional) class" in card


def test_small_and_merged_lora_students_export(digits, tmp_path):
    small = build_student_net(digits, "small", small={"block_out_channels": [8, 16], "norm_num_groups": 4})
    _perturb(small, 1)
    diff, _, _ = _pixel_round_trip(Student(small, timestep_levels(digits.sigma_grid(), 1)), tmp_path / "s", {})
    assert diff < 1e-4
    lora = build_student_net(digits, "lora", lora_rank=4)
    _perturb(lora, 2, 0.05)
    student = Student(lora, timestep_levels(digits.sigma_grid(), 1))
    with pytest.raises(UserError, match="--merge"):
        _pixel_round_trip(student, tmp_path / "l", {})
    diff, _, _ = _pixel_round_trip(student, tmp_path / "m", {}, {"merge": True})
    assert diff < 1e-4
    art = json.loads((tmp_path / "l" / "art" / "student.json").read_text())
    assert art["members"][0]["lora"]["rank"] == 4  # the artefact stores the adapter over the teacher, not a copy
    teacher_bytes = Path(DIGITS, "diffusion_pytorch_model.safetensors").stat().st_size
    assert (tmp_path / "l" / "art" / "student.safetensors").stat().st_size < 0.5 * teacher_bytes


def test_consistency_and_boot_students_export_or_refuse(digits, tmp_path):
    from diffdistill.methods.boot import BootStudent
    from diffdistill.methods.consistency import ConsistencyDenoiser

    net = build_student_net(digits, "copy")
    _perturb(net, 3)
    cd = Student(ConsistencyDenoiser(net, 0.002, 0.5), [80.0], "ddim")  # CD on a Karras grid: sigma 80
    diff, sched, _ = _pixel_round_trip(cd, tmp_path / "cd", {}, tol=1e-3)
    assert sched["_class_name"] == "EulerDiscreteScheduler" and diff < 1e-3
    ict = Student(ConsistencyDenoiser(net, 0.002, 0.5), [80.0, 0.821], "fresh")
    save_artefact(ict, tmp_path / "ict", {"teacher": DIGITS})
    with pytest.raises(UserError, match="consistency-parameterised"):
        export_generator(str(tmp_path / "ict"), str(tmp_path / "ict_exp"))
    assert not (tmp_path / "ict_exp").exists()  # nothing half-made
    diff, _, _ = _pixel_round_trip(ict, tmp_path / "ict1", {}, {"steps": 1}, tol=1e-3)
    assert diff < 1e-3
    boot = BootStudent(net, 0.01, 157.0, 1.0)
    diff, sched, _ = _pixel_round_trip(boot, tmp_path / "boot", {})
    assert sched["_class_name"] == "EulerDiscreteScheduler" and diff < 1e-4


def test_routed_student_sends_each_label_to_its_member_and_round_trips(digits, tmp_path):
    a, b = build_student_net(digits, "copy"), build_student_net(digits, "copy")
    _perturb(a, 4)
    _perturb(b, 5)
    levels = timestep_levels(digits.sigma_grid(), 1)
    routed = RoutedStudent([Student(a, levels), Student(b, levels)], [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    save_artefact(routed, tmp_path / "art", {"teacher": DIGITS})
    gen = load_generator(tmp_path / "art", device="cpu")
    labels = [7, 2, 9, 0, 5, 4]
    mixed = gen.sample(6, labels=labels, seed=3)
    for k, member in enumerate((a, b)):
        idx = [i for i, c in enumerate(labels) if (c >= 5) == bool(k)]
        z = torch.stack([torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(mix_seed(3, i))) for i in idx])
        with torch.no_grad():
            alone = member(z * levels[0], levels[0], torch.tensor([labels[i] for i in idx])).clamp(-1, 1)
        assert torch.allclose(mixed[idx], alone, atol=1e-5)
    from diffdistill.generator import Generator

    half = Generator(RoutedStudent([Student(a, levels)], [[0, 1, 2, 3, 4]]))
    with pytest.raises(UserError, match="class label 7 belongs to no student"):
        half.sample(2, labels=[1, 7])


def test_artefact_loading_is_strict_and_builds_no_training_parts(digits, tmp_path):
    net = build_student_net(digits, "copy")
    save_artefact(Student(net, [157.4]), tmp_path / "art", {"teacher": DIGITS})
    art = load_artefact(tmp_path / "art")
    assert isinstance(art.model, Student) and art.components is None
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "art" / "student.safetensors"))
    state.pop(next(iter(state)))
    save_file(state, str(tmp_path / "art" / "student.safetensors"))
    with pytest.raises(UserError, match="does not match its network: missing"):
        load_artefact(tmp_path / "art")
    (tmp_path / "art" / "student.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="corrupt"):
        load_artefact(tmp_path / "art")


def test_sampling_imports_no_training_code(tmp_path, digits):
    save_artefact(Student(build_student_net(digits, "copy"), [157.4]), tmp_path / "art", {"teacher": DIGITS})
    code = (f"import sys, diffdistill\ng = diffdistill.load_generator({str(tmp_path / 'art')!r}, device='cpu')\n"
            "g.sample(2)\nbad = [m for m in sys.modules if m.startswith(('diffdistill.training', "
            "'diffdistill.methods.dmd2', 'diffdistill.config'))]\nassert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


# --------------------------------------------------------------------------------------------------
# Text-to-image
TEXT_PIPE = """
import torch, diffusers
d = torch.load("in.pt")
pipe = diffusers.DiffusionPipeline.from_pretrained("{folder}")
{lora}out = pipe(d["prompts"], num_inference_steps={k}, guidance_scale=0, latents=d["z"], output_type="pt",
           generator=torch.Generator().manual_seed(5)).images
torch.save(out, "out.pt")
"""


@pytest.mark.parametrize("sdxl", [False, True])
@pytest.mark.parametrize("kind", ["copy", "lora"])
def test_text_student_exports_a_pipeline_or_an_adapter(tmp_path, sdxl, kind):
    pipe = sd_pipeline(tmp_path, sdxl=sdxl)
    pipe.save_pretrained(tmp_path / "teacher")
    teacher = load_teacher(tmp_path / "teacher")
    net = build_student_net(teacher.denoiser, kind, lora_rank=4)
    _perturb(net, 6, 0.05)
    student = Student(net, timestep_levels(teacher.denoiser.sigma_grid(), 2), "fresh")
    save_artefact(student, tmp_path / "art", {"method": "dmd2", "teacher": str(tmp_path / "teacher"), "latent": True})
    exp = export_generator(str(tmp_path / "art"), str(tmp_path / "exp"))
    prompts = ["a cat", "ca"]
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.save({"z": z, "prompts": prompts}, tmp_path / "in.pt")
    if kind == "lora":
        assert (exp / "pytorch_lora_weights.safetensors").is_file() and not (exp / "unet").exists()
        lora = (f'pipe.load_lora_weights("{exp}")\n'
                f'pipe.scheduler = diffusers.LCMScheduler.from_pretrained("{exp}", subfolder="scheduler")\n')
        _run_diffusers(TEXT_PIPE.format(folder=tmp_path / "teacher", lora=lora, k=2), tmp_path)
    else:
        assert json.loads((exp / "model_index.json").read_text())["_class_name"].startswith("StableDiffusion")
        _run_diffusers(TEXT_PIPE.format(folder=exp, lora="", k=2), tmp_path)
    theirs = torch.load(tmp_path / "out.pt")
    gen = load_generator(exp, device="cpu")
    assert gen.nfe() == 2
    ours = gen.decode(_ours(gen, z, gen.encode_prompts(prompts), vp=True))
    assert ((ours.clamp(-1, 1) + 1) / 2 - theirs).abs().max().item() < 1e-4


# --------------------------------------------------------------------------------------------------
# Multi-student text-to-image: students routed by prompt (MSD, msd.partition: pca)
ROUTED_PROMPTS = ["a cat", "a cab", "abc", "ca ca", "the bat", "a dog", "zebra", "quiet fox", "big owl"]
CARD_HOOKS = """evaluated = [0] * len(students)  # samples each student's UNet evaluated, summed over steps
for j, (u, _) in enumerate(students):
    u.register_forward_pre_hook(lambda mod, args, j=j: evaluated.__setitem__(j, evaluated[j] + len(args[0])))
"""


def _card_code(exp: Path, prompts: list[str]) -> str:
    """The card's sampling code as written, on this folder and these prompts, saving what it computed."""
    import re

    code = (exp / "README.md").read_text().split("```python\n")[1].split("```")[0]
    code = code.replace('DIR = "path/to/this/folder"', f"DIR = {str(exp)!r}")
    code, n = re.subn(r"^prompts = .*$", lambda m: CARD_HOOKS + f"prompts = {prompts!r}", code, count=1, flags=re.MULTILINE)
    assert n == 1 and "import diffdistill" not in code and "from diffdistill" not in code
    return code + ('torch.save({"student": student, "images": images, "latents": latents, "evaluated": evaluated,'
                   ' "pil": len(pil_images)}, "out.pt")\n')


@pytest.mark.parametrize("sdxl", [False, True])
def test_prompt_routed_students_export_and_the_cards_code_samples_them(tmp_path, sdxl):
    """Three 2-step students behind a PCA prompt router: the card's code (plain diffusers) routes every prompt
    as diffdistill does and gives diffdistill's images from the same noise, one evaluation per sample and step."""
    pipe = sd_pipeline(tmp_path, sdxl=sdxl)
    pipe.save_pretrained(tmp_path / "teacher")
    teacher = load_teacher(tmp_path / "teacher")
    levels = timestep_levels(teacher.denoiser.sigma_grid(), 2)
    members = []
    for k in range(3):
        net = build_student_net(teacher.denoiser, "copy")
        _perturb(net, 20 + k, 0.05)
        members.append(Student(net, levels, "fresh"))
    part = PCAPartition.fit(pooled_text_embedding(teacher.encode_prompts(ROUTED_PROMPTS)), 3)
    save_artefact(RoutedStudent(members, part), tmp_path / "art",
                  {"method": "msd", "teacher": str(tmp_path / "teacher"), "latent": True})
    exp = export_generator(str(tmp_path / "art"), str(tmp_path / "exp"))

    index = json.loads((exp / "model_index.json").read_text())
    assert index["_class_name"] == ("StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline")
    names = [f"student_{k}" for k in range(3)]
    for name in names:
        assert (exp / name / "unet" / "config.json").is_file()
        assert json.loads((exp / name / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == \
            "LCMScheduler"
    router = json.loads((exp / "router.json").read_text())
    assert router["members"] == names and router["num_students"] == 3
    assert router["embedding"] == ("pooled_prompt_embeds" if sdxl else "mean_of_prompt_embeds")
    assert PCAPartition.from_json(router).tree == part.tree
    assert (exp / "student" / "student.json").is_file() and "router.json" in (exp / "README.md").read_text()

    _run_diffusers(_card_code(exp, ROUTED_PROMPTS), tmp_path)
    theirs = torch.load(tmp_path / "out.pt")
    gen = load_generator(exp, device="cpu")  # the export, as `diffdistill sample --checkpoint EXPORT` reads it
    assert isinstance(gen.model, RoutedStudent) and gen.nfe() == 2
    cond = gen.encode_prompts(ROUTED_PROMPTS)
    route = gen.model.route(cond)
    assert torch.equal(theirs["student"], route)  # (a) the card routes every prompt as diffdistill does
    assert torch.equal(route, part.route(pooled_text_embedding(teacher.encode_prompts(ROUTED_PROMPTS))))
    assert sorted(set(route.tolist())) == [0, 1, 2]  # every student serves some of these prompts
    # (b) the same images from the same noise: the card draws the latents, then its students' fresh noise, from
    # one generator, member after member, as RoutedStudent does
    g = torch.Generator().manual_seed(0)
    z = torch.randn((len(ROUTED_PROMPTS), *gen.denoiser.sample_shape), generator=g)
    assert torch.equal(z, theirs["latents"])
    s0 = gen.model.levels[0]
    with torch.no_grad():
        ours = (gen.decode(gen.model(z * (1 + s0**2) ** 0.5 / s0, cond, generator=g)) + 1) / 2
    assert theirs["images"].shape == ours.shape and theirs["pil"] == len(ROUTED_PROMPTS)
    assert (theirs["images"] - ours).abs().max().item() < 1e-4
    assert theirs["evaluated"] == [2 * int((route == k).sum()) for k in range(3)]  # each prompt, its own student
    with torch.no_grad():  # the members differ, so a prompt sent to another student would show above
        x0 = [m.net(z * (1 + s0**2) ** 0.5, s0, cond) for m in gen.model.members]
    assert min((x0[a] - x0[b]).abs().max().item() for a, b in ((0, 1), (0, 2), (1, 2))) > 1e-3


def test_prompt_routed_pixel_text_students_refuse_export_in_one_line(tmp_path):
    teacher = load_teacher(DIGITS_TEXT)
    levels = timestep_levels(teacher.denoiser.sigma_grid(), 1)
    members = [Student(build_student_net(teacher.denoiser, "copy"), levels) for _ in range(2)]
    prompts = ["a one", "the digit two", "a handwritten seven", "number nine"]
    part = PCAPartition.fit(pooled_text_embedding(teacher.encode_prompts(prompts)), 2)
    save_artefact(RoutedStudent(members, part), tmp_path / "art", {"method": "msd", "teacher": DIGITS_TEXT})
    with pytest.raises(UserError, match="pixel-space text student .* no diffusers pipeline class") as e:
        export_generator(str(tmp_path / "art"), str(tmp_path / "exp"))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "exp").exists()


# --------------------------------------------------------------------------------------------------
# Trained through the loop: every method and student kind, exported and sampled by plain diffusers
TRAINED = {  # name: (config, overrides, export kwargs, tolerance)
    "dmd2_copy": ("dmd2", [], {}, 1e-4),
    "dmd2_4step": ("dmd2_4step", [], {}, 1e-4),
    "dmd2_small": ("dmd2", ["student.kind=small", "student.small={block_out_channels: [8, 8], norm_num_groups: 4}"],
                   {}, 1e-4),
    "dmd2_lora_merged": ("dmd2", ["student.kind=lora", "student.lora_rank=4"], {"merge": True}, 1e-4),
    "ict_1step": ("ict", [], {"steps": 1}, 1e-3),
    "cd": ("cd", [], {}, 1e-3),
    "tscd_2seg_plain": ("tscd", ["tscd.segments=[2]", "tscd.stage_starts=null", "tscd.consistency_param=false",
                                 "student.steps=2"], {}, 1e-4),
    "boot": ("boot", [], {}, 1e-4),
}


@pytest.fixture(scope="module")
def trained_exports(tiny_teacher_run, tmp_path_factory):
    """Train each TRAINED case 2 steps on the tiny 8-px teacher, export it, and sample every export in ONE
    subprocess that imports only torch and diffusers; returns ``{name: (diffusers, diffdistill, tol)}``."""
    from diffdistill.config import load_config
    from diffdistill.paths import resolve_path
    from diffdistill.training.loop import train

    root = tmp_path_factory.mktemp("trained")
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 3, 7, 9])
    torch.save({"z": z, "labels": labels}, root / "in.pt")
    cases, ours = {}, {}
    for name, (config, overrides, kw, tol) in TRAINED.items():
        cfg = load_config(resolve_path(f"configs/digits/{config}.yaml"), [
            f"output_dir={root / name}", f"teacher.path={tiny_teacher_run}", "data.resolution=8", "train.steps=2",
            "train.batch_size=4", "train.checkpoint_every=2", "train.sample_every=0", "train.log_every=1",
            "train.mixed_precision=no", *overrides])
        run = train(cfg)
        exp = export_generator(str(run), str(root / f"{name}-export"), **kw)
        gen = load_generator(run, device="cpu")
        k = load_generator(exp, device="cpu").nfe()
        sched = json.loads((exp / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
        ours[name] = (_ours(gen, z, labels, sched != "EulerDiscreteScheduler", steps=k), tol)
        cases[name] = (str(exp), k)
    script = PIXEL_LOOP + "".join(f"sample_export({exp!r}, {k}, {name + '.pt'!r})\n"
                                  for name, (exp, k) in cases.items())
    _run_diffusers(script, root)
    return root, {name: (torch.load(root / f"{name}.pt"), ours[name][0], ours[name][1]) for name in TRAINED}


@pytest.mark.parametrize("name", list(TRAINED))
def test_trained_student_export_matches_diffusers(trained_exports, name):
    theirs, ours, tol = trained_exports[1][name]
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max().item() < tol


def test_loop_trained_text_lora_student_exports_an_adapter_diffusers_loads(tmp_path):
    from diffdistill.config import load_config
    from diffdistill.paths import resolve_path
    from diffdistill.training.loop import train

    sd_pipeline(tmp_path).save_pretrained(tmp_path / "teacher")
    (tmp_path / "prompts.txt").write_text("a cat\nca\nabc\n")
    cfg = load_config(resolve_path("configs/sd15/dmd2.yaml"), [
        f"output_dir={tmp_path / 'run'}", f"teacher.path={tmp_path / 'teacher'}",
        f"data.path={tmp_path / 'prompts.txt'}",
        "data.resolution=16", "student.kind=lora", "student.lora_rank=4", "train.steps=2", "train.batch_size=2",
        "train.checkpoint_every=2", "train.sample_every=0", "train.log_every=1", "train.mixed_precision=no",
        "train.lr=1e-2", "train.warmup_steps=0", "dmd2.dfake_gen_update_ratio=1"])
    run = train(cfg)
    art = json.loads((run / "checkpoints" / "step-0000002" / "student" / "student.json").read_text())
    assert art["text"] and art["latent"] and art["members"][0]["lora"]["rank"] == 4
    exp = export_generator(str(run), str(tmp_path / "exp"))
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.save({"z": z, "prompts": ["a cat", "abc"]}, tmp_path / "in.pt")
    lora = (f'pipe.load_lora_weights("{exp}")\n'
            f'pipe.scheduler = diffusers.DDIMScheduler.from_pretrained("{exp}", subfolder="scheduler")\n')
    _run_diffusers(TEXT_PIPE.format(folder=tmp_path / "teacher", lora=lora, k=1), tmp_path)
    gen = load_generator(run, device="cpu")
    ours = gen.decode(_ours(gen, z, gen.encode_prompts(["a cat", "abc"]), vp=True))
    theirs = torch.load(tmp_path / "out.pt")
    assert ((ours.clamp(-1, 1) + 1) / 2 - theirs).abs().max().item() < 1e-4
    # the adapter moved the student: the teacher alone samples differently
    teacher = load_generator(tmp_path / "teacher", device="cpu")
    with torch.no_grad():
        plain = teacher.decode(teacher.denoiser(z * (1 + gen.model.levels[0] ** 2) ** 0.5, gen.model.levels[0],
                                                gen.encode_prompts(["a cat", "abc"])))
    assert (plain - ours).abs().max().item() > 1e-3


def test_load_generator_on_a_dmd2_checkpoint_builds_only_the_student(trained_exports, tmp_path):
    """No fake score, GAN head, optimizer or training module: only the student's own parameters."""
    run = trained_exports[0] / "dmd2_copy"
    ckpt = run / "checkpoints" / "step-0000002"
    from safetensors.torch import load_file

    student_params = sum(t.numel() for t in load_file(str(ckpt / "student.safetensors")).values())
    code = textwrap.dedent(f"""
        import sys, torch
        def refuse(*a, **k):
            raise AssertionError("an optimizer was built")
        torch.optim.Optimizer.__init__ = refuse
        import diffdistill
        gen = diffdistill.load_generator({str(run)!r}, device="cpu")
        gen.sample(2)
        n = sum(p.numel() for p in gen.model.parameters())
        assert n == {student_params}, n
        bad = [m for m in sys.modules if m.startswith(("diffdistill.training", "diffdistill.methods.dmd2",
                                                      "diffdistill.methods.gan_head", "diffdistill.config"))]
        assert not bad, bad
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    meta = json.loads((ckpt / "meta.json").read_text())
    assert {"fake_score", "gan_head"} <= set(meta["networks"])  # the checkpoint has them; sampling ignores them


def test_toy_mlp_student_artefact_round_trips_exactly(tmp_path):
    from diffdistill.toy import mlp_denoiser

    net = mlp_denoiser(2, hidden=32)
    _perturb(net, 7)
    student = Student(net, [80.0, 0.8], "fresh")
    save_artefact(student, tmp_path / "art", {"method": "dmd2"})
    loaded = load_artefact(tmp_path / "art").model
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = student(z, generator=torch.Generator().manual_seed(1))
        b = loaded(z, generator=torch.Generator().manual_seed(1))
    assert loaded.levels == student.levels and torch.equal(a, b)
