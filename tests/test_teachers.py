"""Teacher adapters and loaders on tiny diffusers models built from configs (no downloads)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMPipeline, DDPMScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel, UNet2DModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from diffdistill import samplers
from diffdistill.denoiser import CFGDenoiser, TextCond
from diffdistill.errors import UserError
from diffdistill.students import build_student_net
from diffdistill.teachers import (FlowMatchingDenoiser, VPUNetDenoiser, ddim_sigmas, load_teacher,
                                  save_teacher_folder)

TIMESTEPS = [1, 250, 500, 999]


def x0_atol(sigma) -> float:
    """1e-5, scaled by sigma above 1: x0 = x - sigma eps amplifies float32 rounding of eps by sigma."""
    return 1e-5 * max(1.0, float(sigma))


def tiny_unet(num_class_embeds=11, in_channels=1) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=in_channels, out_channels=in_channels, layers_per_block=1,
                       block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=8,
                       num_class_embeds=num_class_embeds).eval()


def tiny_text_unet(sdxl: bool = False) -> UNet2DConditionModel:
    torch.manual_seed(1)
    extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=16 + 6 * 8) if sdxl else {}
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=4,
                                cross_attention_dim=64 if sdxl else 32, attention_head_dim=4, **extra).eval()


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(2)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=4, layers_per_block=1, sample_size=16).eval()


def tiny_tokenizer(folder) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over letters, written as vocab.json + merges.txt like SD's tokenizer/ folder."""
    folder.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = list(letters) + [c + "</w>" for c in letters] + ["ca", "<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\nc a\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 12}))
    return CLIPTokenizer.from_pretrained(str(folder))


def tiny_text_encoder(with_projection: bool = False):
    torch.manual_seed(3 + with_projection)
    config = CLIPTextConfig(vocab_size=55, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=12, projection_dim=16,
                            bos_token_id=53, eos_token_id=54, pad_token_id=54)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def ddpm(prediction_type="epsilon") -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=False)


def sd_pipeline(tmp_path, sdxl=False):
    tok = tiny_tokenizer(tmp_path / "tok")
    parts = dict(vae=tiny_vae(), text_encoder=tiny_text_encoder(), tokenizer=tok, unet=tiny_text_unet(sdxl),
                 scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                         beta_start=0.00085, beta_end=0.012, clip_sample=False))
    if sdxl:
        return StableDiffusionXLPipeline(text_encoder_2=tiny_text_encoder(True), tokenizer_2=tok, **parts)
    return StableDiffusionPipeline(safety_checker=None, feature_extractor=None, requires_safety_checker=False, **parts)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A tiny SD 1.5-layout pipeline saved once for the module: ``(pipeline, folder)``."""
    root = tmp_path_factory.mktemp("sd")
    pipe = sd_pipeline(root)
    pipe.save_pretrained(root / "c")
    return pipe, root / "c"


def vp_input(x_t: torch.Tensor, scheduler, t: int) -> torch.Tensor:
    """Sigma-space sample of the VP sample x_t at timestep t: x = x_t / sqrt(abar_t)."""
    return x_t / scheduler.alphas_cumprod[t].sqrt()


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@torch.no_grad()
def test_vp_adapter_matches_ddpm_scheduler_x0(prediction_type):
    unet, sched = tiny_unet(), ddpm(prediction_type)
    d = VPUNetDenoiser(unet, sched, num_classes=10)
    x_t, labels = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 5, 10])
    assert torch.allclose(d.sigmas, ((1 - sched.alphas_cumprod) / sched.alphas_cumprod).sqrt(), rtol=1e-6)
    for t in TIMESTEPS:
        ref = sched.step(unet(x_t, t, class_labels=labels).sample, t, x_t).pred_original_sample
        got = d(vp_input(x_t, sched, t), d.sigmas[t], labels)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref, atol=x0_atol(d.sigmas[t]), rtol=1e-5, msg=f"t={t}")


@torch.no_grad()
def test_text_unet_and_sd_prompt_encoding_match_diffusers(sd_folder):
    pipe, folder = sd_folder
    teacher = load_teacher(folder)
    assert teacher.kind == "sd" and teacher.image_shape == (3, 16, 16) and teacher.denoiser.sample_shape == (4, 8, 8)
    prompts = ["a cat", "cab"]
    cond = teacher.encode_prompts(prompts)
    ref_embeds, ref_null = pipe.encode_prompt(prompts, "cpu", 1, True, [""] * 2)
    torch.testing.assert_close(cond.embeds, ref_embeds)
    torch.testing.assert_close(teacher.denoiser.null_cond(cond).embeds, ref_null)
    sched, unet = pipe.scheduler, pipe.unet
    x_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    for t in TIMESTEPS:
        ref = sched.step(unet(x_t, t, encoder_hidden_states=ref_embeds).sample, t, x_t).pred_original_sample
        got = teacher.denoiser(vp_input(x_t, sched, t), teacher.denoiser.sigmas[t], cond)
        torch.testing.assert_close(got, ref, atol=x0_atol(teacher.denoiser.sigmas[t]), rtol=1e-5, msg=f"t={t}")


@torch.no_grad()
def test_sdxl_folder_matches_pipeline_encoding_and_unet(tmp_path):
    pipe = sd_pipeline(tmp_path, sdxl=True)
    pipe.save_pretrained(tmp_path / "sdxl")
    teacher = load_teacher(tmp_path / "sdxl")
    assert teacher.kind == "sdxl"
    cond = teacher.encode_prompts(["a cat"])
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt("a cat", device="cpu", do_classifier_free_guidance=True)
    torch.testing.assert_close(cond.embeds, embeds)
    torch.testing.assert_close(cond.pooled, pooled)
    time_ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), torch.float32, text_encoder_projection_dim=16)
    torch.testing.assert_close(cond.time_ids, time_ids)
    null = teacher.denoiser.null_cond(cond)  # force_zeros_for_empty_prompt: zero embeddings
    assert torch.equal(null.embeds, neg) and torch.equal(null.pooled, neg_pooled) and torch.equal(null.time_ids, time_ids)
    x_t, t = torch.randn(1, 4, 8, 8), 400
    out = pipe.unet(x_t, t, encoder_hidden_states=embeds,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    ref = pipe.scheduler.step(out, t, x_t).pred_original_sample
    torch.testing.assert_close(teacher.denoiser(vp_input(x_t, pipe.scheduler, t), teacher.denoiser.sigmas[t], cond),
                               ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@torch.no_grad()
def test_ddim_sampler_matches_diffusers_ddim_loop(set_alpha_to_one):
    unet = tiny_unet(num_class_embeds=None)
    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=set_alpha_to_one)
    d = VPUNetDenoiser(unet, scheduler)
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    scheduler.set_timesteps(5)
    sample = z  # diffusers: x_T = z (init_noise_sigma = 1)
    for t in scheduler.timesteps:
        sample = scheduler.step(unet(sample, t).sample, t, sample, eta=0.0).prev_sample
    sigmas = ddim_sigmas(scheduler, 5)
    ours = samplers.ddim(d, z * (1 + sigmas[0].double() ** 2).sqrt().float(), sigmas)  # VP x_T = z <=> x = z sqrt(1+s^2)
    assert ours.nfe == 5 + (not set_alpha_to_one)
    if set_alpha_to_one:  # final level 0: diffusers' last sample is x0
        torch.testing.assert_close(ours.x, sample, atol=1e-4, rtol=1e-4)
    else:  # diffusers stops at VP level t=0; our sampler takes one more step to 0 from there
        s0 = sigmas[-1]
        torch.testing.assert_close(ours.x, d(sample * (1 + s0.double() ** 2).sqrt().float(), s0), atol=1e-4, rtol=1e-4)


def test_null_cond_cfg_rebuild_and_bottleneck():
    d = VPUNetDenoiser(tiny_unet(), ddpm(), num_classes=10)
    labels = torch.tensor([1, 2])
    assert d.null_cond(labels).tolist() == [10, 10]
    no_null = VPUNetDenoiser(tiny_unet(num_class_embeds=10), ddpm())
    assert no_null.num_classes == 10
    with pytest.raises(ValueError, match="no unconditional class"):
        no_null.null_cond(labels)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        guided = CFGDenoiser(d, 3.0)(x, 2.0, labels)
        u, c = d(x, 2.0, d.null_cond(labels)), d(x, 2.0, labels)
    torch.testing.assert_close(guided, u + 3.0 * (c - u), atol=1e-5, rtol=1e-5)
    small = build_student_net(d, "small", small={"block_out_channels": [8]})
    assert isinstance(small, VPUNetDenoiser) and len(small.unet.config.down_block_types) == 1
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in d.parameters())
    assert torch.equal(small.sigmas, d.sigmas) and small.prediction_type == d.prediction_type
    assert small(x, 2.0, labels).shape == x.shape and small.null_cond(labels).tolist() == [10, 10]
    x0, feats = d.bottleneck(x, 2.0, labels)
    assert feats.shape == (2, 16, 4, 4) and feats.dtype == torch.float32 and feats.requires_grad
    torch.testing.assert_close(x0, c)
    wrapper = torch.nn.Sequential()  # stands in for a DDP wrapper: the hook sits on the inner UNet
    wrapper.add_module("module", d)
    with d.capture_bottleneck() as captured:
        wrapper.module(x, 2.0, labels)
    assert len(captured) == 1 and torch.allclose(captured[0], feats)
    unconditional = VPUNetDenoiser(tiny_unet(num_class_embeds=None), ddpm())
    with torch.no_grad():  # an unconditional UNet ignores labels
        assert torch.equal(unconditional(x, 2.0, labels), unconditional(x, 2.0))


def test_flow_matching_adapter_is_exact_for_the_true_velocity():
    g = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    seen = {}

    class TrueVelocity(torch.nn.Module):
        def forward(self, x_t, timestep, cond):
            seen["timestep"], seen["x_t"] = timestep, x_t
            return noise - x0  # v = n - x0

    d = FlowMatchingDenoiser(TrueVelocity(), (2, 4, 4), timestep_scale=1000.0)
    sigma = torch.tensor([0.1, 1.0, 30.0])
    out = d(x0 + sigma.view(-1, 1, 1, 1) * noise, sigma)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-5)
    t = sigma / (1 + sigma)
    torch.testing.assert_close(seen["timestep"], t * 1000)
    torch.testing.assert_close(seen["x_t"], (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise)
    assert d.sigma_min == pytest.approx(1e-3 / (1 - 1e-3)) and d.sigma_max == pytest.approx(999.0)


# ------------------------------------------------------------------------------------------------
def _assert_same_outputs(a, b, cond):
    x = torch.randn(2, *a.sample_shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for s in (0.05, 1.0, 20.0):
            assert torch.equal(a(x, s, cond), b(x, s, cond))


def test_layout_round_trips(tmp_path):
    unet, sched = tiny_unet(), ddpm("v_prediction")
    ref = VPUNetDenoiser(unet, sched, num_classes=10)
    labels = torch.tensor([3, 10])
    # (a) our own folder, written atomically (twice: the second replaces the first)
    save_teacher_folder(tiny_unet(num_class_embeds=5), sched, tmp_path / "a", {"num_classes": 4})
    save_teacher_folder(unet, sched, tmp_path / "a", {"num_classes": 10, "sigma_data": 0.5})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    a = load_teacher(tmp_path / "a")
    assert a.kind == "unet" and a.num_classes == 10 and a.image_shape == (1, 8, 8) and a.vae is None
    assert not any(p.requires_grad for p in a.denoiser.parameters()) and not a.denoiser.training
    _assert_same_outputs(ref, a.denoiser, labels)
    images = torch.rand(2, 1, 8, 8) * 2 - 1
    assert torch.equal(a.encode_images(images), images) and torch.equal(a.decode(images), images)
    half = load_teacher(tmp_path / "a", dtype="bfloat16").denoiser  # the net in bf16, the output in float32
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        out, out32 = half(x, 1.0, labels), ref(x, 1.0, labels)
    assert half.unet.dtype == torch.bfloat16 and out.dtype == torch.float32
    assert (out - out32).abs().max() < 0.1
    # (b) a diffusers pipeline folder (model_index.json + unet/ + scheduler/)
    DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(tmp_path / "b")
    b = load_teacher(tmp_path / "b", dtype="float32")
    assert b.num_classes == 11  # no diffdistill.json: every embedding is a real class, no null label
    _assert_same_outputs(ref, b.denoiser, labels)
    # (d) a run folder of `diffdistill teacher train`
    save_teacher_folder(unet, sched, tmp_path / "run" / "teacher", {"num_classes": 10})
    (tmp_path / "run" / "config.yaml").write_text("method: dsm\n")
    _assert_same_outputs(ref, load_teacher(tmp_path / "run").denoiser, labels)


@torch.no_grad()
def test_sd_layout_round_trip_and_vae(sd_folder):
    pipe, folder = sd_folder
    c = load_teacher(folder)
    cond = c.encode_prompts(["a cat", ""])
    ref = VPUNetDenoiser(pipe.unet, pipe.scheduler)
    _assert_same_outputs(ref, c.denoiser, cond)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = c.encode_images(images)
    torch.testing.assert_close(latents, pipe.vae.encode(images).latent_dist.mean * pipe.vae.config.scaling_factor)
    decoded = c.decode(latents)
    assert decoded.shape == images.shape and decoded.abs().max() <= 1
    torch.testing.assert_close(decoded, pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample.clamp(-1, 1))


def test_missing_and_corrupt_files_raise_user_errors(tmp_path, monkeypatch, sd_folder):
    sched = ddpm()
    save_teacher_folder(tiny_unet(), sched, tmp_path / "a", {"num_classes": 10})
    (tmp_path / "a" / "scheduler_config.json").unlink()
    with pytest.raises(UserError, match=r"has no scheduler_config\.json"):
        load_teacher(tmp_path / "a")
    DDPMPipeline(unet=tiny_unet(), scheduler=sched).save_pretrained(tmp_path / "b")
    weights = tmp_path / "b" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # truncated
    with pytest.raises(UserError, match=r"diffusion_pytorch_model\.safetensors is corrupt"):
        load_teacher(tmp_path / "b")
    weights.unlink()
    with pytest.raises(UserError, match=r"has no unet/diffusion_pytorch_model\.safetensors"):
        load_teacher(tmp_path / "b")
    (tmp_path / "b" / "unet" / "config.json").unlink()
    with pytest.raises(UserError, match=r"has no unet/config\.json"):
        load_teacher(tmp_path / "b")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty has no unet/config\.json"):
        load_teacher(tmp_path / "empty")
    with pytest.raises(UserError, match=r"does not exist$"):
        load_teacher(tmp_path / "nowhere")
    shutil.copytree(sd_folder[1], tmp_path / "c")
    (tmp_path / "c" / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(UserError, match=r"has no text_encoder/model\.safetensors"):
        load_teacher(tmp_path / "c")

    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(UserError, match="does not exist locally and could not be downloaded"):
        load_teacher("some-org/some-model")


def test_text_denoiser_unconditional_uses_null_text(sd_folder):
    d = load_teacher(sd_folder[1]).denoiser
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(d(x, 1.0, None), d(x, 1.0, d.null_cond(TextCond(torch.zeros(2, 1, 1)))))
