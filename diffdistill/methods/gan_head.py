"""DMD2's GAN discriminator: a small head on the fake score's bottleneck features.

There is no separate discriminator network in DMD2 (Yin et al. 2024, Sec. 4.2): the fake score's encoder
is the discriminator's backbone, and a few layers (the official ``cls_pred_branch``) turn its bottleneck
features into one realism logit per sample.

Bottleneck features are read with a forward hook, so they come out of an ordinary call of the denoiser —
also through a DDP wrapper, whose forward must run for the backbone's gradients to be all-reduced:
- an adapter's own ``capture_bottleneck()`` / ``bottleneck(x, sigma, cond)`` (the diffusers VP adapter:
  the UNet's mid-block output ``[B, C, h, w]``);
- any other network with a submodule named ``mid_block``: its output;
- :class:`~diffdistill.denoiser.EDMPrecond` around an MLP (toy networks): the input of the last
  ``nn.Linear``, i.e. the last hidden activation ``[B, hidden]``;
- a denoiser's own ``feature_module()`` / ``bottleneck_shape()`` (EDM's SongUNet / ADM,
  :class:`~diffdistill.teachers.edm.EDMNetDenoiser`: the encoder's output ``[B, C, h, w]``, the official
  ``return_bottleneck``).

:func:`bottleneck_features` ends the forward pass at the bottleneck (a UNet's decoder never runs), as the
official GAN branch does; :func:`denoise_with_features` returns ``x0`` and the features of a full pass.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from ..denoiser import Cond, Denoiser, EDMPrecond, TextCond


def feature_module(denoiser: nn.Module) -> tuple[Optional[nn.Module], str]:
    """The submodule whose activations are the bottleneck features, and how to read them.

    Returns the denoiser's own ``feature_module()`` when it has one (EDM networks: the encoder's output),
    ``(module, "output")`` for a UNet ``mid_block``, ``(last_linear, "input")`` for an EDM-preconditioned MLP,
    ``(None, "")`` when none exists.
    """
    own = getattr(denoiser, "feature_module", None)
    if callable(own):
        return own()
    for name, module in denoiser.named_modules():
        if name.split(".")[-1] == "mid_block":
            return module, "output"
    if isinstance(denoiser, EDMPrecond):
        linears = [m for m in denoiser.net.modules() if isinstance(m, nn.Linear)]
        if linears:
            return linears[-1], "input"
    return None, ""


@contextlib.contextmanager
def capture_features(denoiser: nn.Module) -> Iterator[list[Tensor]]:
    """Within the block, every forward of ``denoiser`` appends its bottleneck features to the yielded list.

    Uses the adapter's own ``capture_bottleneck()`` when it has one (the diffusers VP adapter), else a hook
    on the module :func:`feature_module` finds. Raises ``ValueError`` if there is no bottleneck.
    """
    if hasattr(denoiser, "capture_bottleneck"):
        with denoiser.capture_bottleneck() as feats:
            yield feats
        return
    module, where = feature_module(denoiser)
    if module is None:
        raise ValueError(f"{type(denoiser).__name__} has no bottleneck to hook (no 'mid_block' submodule, "
                         "not an EDMPrecond MLP); give it a bottleneck(x, sigma, cond) method")
    feats: list[Tensor] = []
    if where == "output":
        handle = module.register_forward_hook(
            lambda _m, _inp, out: feats.append(out[0] if isinstance(out, (tuple, list)) else out))
    else:
        handle = module.register_forward_pre_hook(lambda _m, inp: feats.append(inp[0]))
    try:
        yield feats
    finally:
        handle.remove()


def denoise_with_features(denoiser: Denoiser, x: Tensor, sigma: Tensor | float, cond: Cond = None,
                          forward: Optional[Callable[..., Tensor]] = None) -> tuple[Tensor, Tensor]:
    """``(x0, features)`` from one evaluation of ``denoiser``; features keep their graph, float32.

    Without ``forward`` a denoiser's own ``bottleneck(x, sigma, cond)`` is used when it has one. With
    ``forward`` (the DDP-wrapped module, so the backbone's gradients are synchronised) the evaluation
    runs through it and the features are captured by a hook (:func:`capture_features`).
    """
    if forward is None and hasattr(denoiser, "bottleneck"):
        x0, feats = denoiser.bottleneck(x, sigma, cond)
        return x0, feats.float()
    with capture_features(denoiser) as feats:
        x0 = (forward or denoiser)(x, sigma, cond)
    return x0, feats[-1].float()


class _StopAtBottleneck(Exception):
    """Raised by the hook of :func:`bottleneck_features` to end a forward pass at the bottleneck."""


def bottleneck_features(denoiser: Denoiser, x: Tensor, sigma: Tensor | float, cond: Cond = None) -> Tensor:
    """Only the bottleneck features (graph kept, float32): the forward stops there, so a UNet's decoder
    never runs — as the official GAN branch (``classify_forward`` / ``return_bottleneck``) does.

    Call it on the raw module. In a DDP run the same iteration must also run the wrapped forward (the
    fake-score loss does), which arms the gradient all-reduce for every parameter, these included.
    """
    module, where = feature_module(denoiser)
    if module is None:  # nothing to hook: a full evaluation through the network's own bottleneck()
        return denoise_with_features(denoiser, x, sigma, cond)[1]
    feats: list[Tensor] = []

    def stop(*args):
        feats.append(args[-1][0] if where == "input" else
                     (args[-1][0] if isinstance(args[-1], (tuple, list)) else args[-1]))
        raise _StopAtBottleneck

    handle = (module.register_forward_pre_hook(stop) if where == "input" else module.register_forward_hook(stop))
    try:
        denoiser(x, sigma, cond)
    except _StopAtBottleneck:
        pass
    finally:
        handle.remove()
    return feats[0].float()


def example_cond(denoiser: Denoiser, batch_size: int = 1) -> Cond:
    """A valid condition for probing the network: the adapter's own, label 0, zero text embeddings or None."""
    device = next((p.device for p in denoiser.parameters()), torch.device("cpu"))
    if hasattr(denoiser, "example_cond"):
        return denoiser.example_cond(batch_size)
    if denoiser.num_classes is not None:
        return torch.zeros(batch_size, dtype=torch.long, device=device)
    for module in denoiser.modules():  # a diffusers UNet2DConditionModel: zero text-encoder outputs
        cfg = getattr(module, "config", None)
        dim = getattr(cfg, "cross_attention_dim", None) if cfg is not None else None
        if dim:
            embeds = torch.zeros(batch_size, 77, int(dim), device=device)
            if getattr(cfg, "addition_embed_type", None) == "text_time":  # SDXL's pooled text + 6 size ids
                pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
                return TextCond(embeds, torch.zeros(batch_size, pooled, device=device),
                                torch.zeros(batch_size, 6, device=device))
            return TextCond(embeds)
    return None


def feature_shape(denoiser: Denoiser) -> tuple[int, ...]:
    """Shape of one sample's bottleneck features: ``(C, h, w)`` or ``(D,)``.

    Read from a diffusers UNet's config where possible (no forward pass: SDXL on a CPU takes a while),
    else from one probing evaluation of a single zero sample at sigma 1.
    """
    own = getattr(denoiser, "bottleneck_shape", None)
    if callable(own):  # EDM networks know it from their architecture
        return tuple(own())
    module, _ = feature_module(denoiser)
    if module is not None:
        for m in denoiser.modules():
            cfg = getattr(m, "config", None)
            channels = getattr(cfg, "block_out_channels", None) if cfg is not None else None
            if channels and len(denoiser.sample_shape) == 3 and getattr(m, "mid_block", None) is module:
                # every down block but the last halves the resolution (diffusers' add_downsample rule)
                f = 2 ** (len(channels) - 1)
                h, w = denoiser.sample_shape[1:]
                return (int(channels[-1]), math.ceil(h / f), math.ceil(w / f))
    device = next((p.device for p in denoiser.parameters()), torch.device("cpu"))
    x = torch.zeros(1, *denoiser.sample_shape, device=device)
    with torch.no_grad():
        _, feats = denoise_with_features(denoiser, x, 1.0, example_cond(denoiser))
    return tuple(feats.shape[1:])


def _norm_groups(channels: int, most: int = 32, min_size: int = 16) -> int:
    """GroupNorm groups: 32 as in the official heads (768 / 1280 channels), fewer for narrow features.

    Each group keeps at least ``min_size`` channels: a GroupNorm over 2 channels of a 1x1 map would
    normalise every pair to (+1, -1) and erase the features.
    """
    for g in range(min(most, channels), 0, -1):
        if channels % g == 0 and channels // g >= min_size:
            return g
    return 1


class GANHead(nn.Module):
    """Realism logit per sample from bottleneck features (DMD2's ``cls_pred_branch``).

    2-D features ``[B, C, h, w]``: (4x4 conv, stride 2, GroupNorm, SiLU) while the map is larger than 4,
    then a conv covering the whole map down to 1x1 (GroupNorm, SiLU), then a 1x1 conv to one channel.
    1-D features ``[B, D]``: Linear, GroupNorm, SiLU, Linear to one logit. Width stays ``C`` (``D``) as
    in the official heads (768 for ImageNet-64, 1280 for SD).

    Args:
        feature_shape: ``(C, h, w)`` or ``(D,)`` of one sample's features (see :func:`feature_shape`).
    """

    def __init__(self, feature_shape: Sequence[int]) -> None:
        super().__init__()
        shape = tuple(int(s) for s in feature_shape)
        c = shape[0]
        groups = _norm_groups(c)
        if len(shape) == 1:
            layers: list[nn.Module] = [nn.Linear(c, c), nn.GroupNorm(groups, c), nn.SiLU(), nn.Linear(c, 1)]
        elif len(shape) == 3:
            h, w = shape[1:]
            layers = []
            while min(h, w) > 4:  # 8x8 -> 4x4 (SD 1.5, ImageNet-64), 32 -> 16 -> 8 -> 4 (SDXL)
                layers += [nn.Conv2d(c, c, 4, stride=2, padding=1), nn.GroupNorm(groups, c), nn.SiLU()]
                h, w = h // 2, w // 2
            layers += [nn.Conv2d(c, c, (h, w)), nn.GroupNorm(groups, c), nn.SiLU(), nn.Conv2d(c, 1, 1)]
        else:
            raise ValueError(f"features must be (C, h, w) or (D,), got {shape}")
        self.feature_shape = shape
        self.net = nn.Sequential(*layers)

    def forward(self, features: Tensor) -> Tensor:
        """Logits ``[B]`` (positive = judged real)."""
        return self.net(features.float()).reshape(features.shape[0])
