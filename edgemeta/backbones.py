"""Backbones: a registry of embedding networks mapping float images [N, C, H, W] to embeddings [N, D].

Every backbone only embeds (no classifier), uses only ops that export cleanly to ONNX and that
TensorRT's parser takes (Conv, BatchNorm, Relu/LeakyRelu/Clip, MaxPool, GlobalAveragePool, Add,
Flatten), and is wrapped with `InputNormalize` in an `Embedder`, so pixel scaling and mean/std
are part of the model that gets exported.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from collections.abc import Callable

import torch
from torch import nn

from edgemeta.runtime.errors import ConfigError
from edgemeta.runtime.preprocess import InputSpec

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def deco(factory):
        _REGISTRY[name] = factory
        return factory
    return deco


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def create_backbone(name: str, in_channels: int = 1, **kwargs) -> nn.Module:
    """Build a registered backbone by name; unknown names or arguments raise ConfigError."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown backbone {name!r}; choose one of {', '.join(list_backbones())}")
    try:
        return _REGISTRY[name](in_channels=in_channels, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad arguments for backbone {name!r}: {exc}") from None


def accepts(name: str, argument: str) -> bool:
    """Whether the registered backbone `name` takes `argument` (False for unknown names)."""
    return name in _REGISTRY and argument in inspect.signature(_REGISTRY[name]).parameters


def deployment_args(name: str, args: dict) -> dict:
    """Backbone arguments for the network that gets exported: the literature's activation-then-pool
    order where the backbone offers pool_first (the same function), so the graph keeps the
    Conv → ReLU pattern that inference runtimes fuse (ONNX Runtime's Conv+Relu, TensorRT's
    conv-BN-activation; the INT8 quantiser calibrates the activation's output) and stays the graph
    that earlier exports validated. Pooling first only pays in eager training."""
    if accepts(name, "pool_first"):
        return {**args, "pool_first": False}
    return dict(args)


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


def _activation_and_pool(activation: nn.Module, pool_first: bool) -> list[nn.Module]:
    """Max-pool 2 and a monotone activation in either order (same function; pooling first runs the
    activation on 4× fewer elements). Neither has parameters, so checkpoints load either way."""
    return [nn.MaxPool2d(2), activation] if pool_first else [activation, nn.MaxPool2d(2)]


@register("conv4")
class Conv4(nn.Module):
    """The standard few-shot Conv4: 4 × (conv3×3-64, BN, ReLU, maxpool 2), flattened.
    28×28 input → 64-d embedding; 84×84 → 1600-d.

    pool_first (default) max-pools before the ReLU: the same function, and the same outputs and
    gradients bit for bit (a monotone activation commutes with max, ties included), with the
    activation and its backward pass on a quarter of the elements. Second-order gradients (MAML)
    agree to rounding: the double backward sums in another order. pool_first=False is the
    literature's order: what gets exported (deployment_args) and the benchmarks' baseline."""

    def __init__(self, in_channels: int = 1, hidden: int = 64, depth: int = 4, pool_first: bool = True):
        super().__init__()
        layers, c = [], in_channels
        for _ in range(depth):
            layers += [*_conv_bn(c, hidden), *_activation_and_pool(nn.ReLU(inplace=True), pool_first)]
            c = hidden
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.features(x), 1)


class _ResBlock12(nn.Module):
    def __init__(self, cin: int, cout: int, pool_first: bool = True):
        super().__init__()
        act = lambda: nn.LeakyReLU(0.1, inplace=True)  # noqa: E731
        self.body = nn.Sequential(*_conv_bn(cin, cout), act(), *_conv_bn(cout, cout), act(), *_conv_bn(cout, cout))
        self.shortcut = nn.Sequential(*_conv_bn(cin, cout, k=1))
        self.out = nn.Sequential(*_activation_and_pool(act(), pool_first))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x) + self.shortcut(x))


@register("resnet12")
class ResNet12(nn.Module):
    """The standard few-shot ResNet-12 (Oreshkin et al. 2018; Lee et al. 2019): four residual
    blocks of three conv3×3-BN-LeakyReLU(0.1) with a 1×1 shortcut and maxpool 2, widths
    64-160-320-640, global average pooled. pool_first: as for Conv4."""

    def __init__(self, in_channels: int = 1, widths: tuple[int, ...] = (64, 160, 320, 640), pool_first: bool = True):
        super().__init__()
        blocks, c = [], in_channels
        for w in widths:
            blocks.append(_ResBlock12(c, int(w), pool_first))
            c = int(w)
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.blocks(x)), 1)


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [*_conv_bn(cin, mid, k=1), nn.ReLU6(inplace=True)]
        layers += [*_conv_bn(mid, mid, stride=stride, groups=mid), nn.ReLU6(inplace=True), *_conv_bn(mid, cout, k=1)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


@register("edgenet")
class EdgeNet(nn.Module):
    """An edge-efficient backbone for a Jetson Nano: MobileNetV2-style inverted residuals
    (1×1 expand, depthwise 3×3, 1×1 linear bottleneck), ReLU6, global average pooled.
    About 0.2 M parameters at width 1.0; BN folds into the convolutions at export."""

    # (expansion, output channels, repeats, stride of the first repeat)
    STAGES = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2), (4, 64, 2, 2), (4, 96, 1, 1))

    def __init__(self, in_channels: int = 1, width: float = 1.0, embed_dim: int = 128):
        super().__init__()
        scale = lambda c: max(8, int(round(c * width / 8)) * 8)  # noqa: E731
        c = scale(32)
        layers: list[nn.Module] = [*_conv_bn(in_channels, c), nn.ReLU6(inplace=True)]
        for t, cout, n, s in self.STAGES:
            for i in range(n):
                layers.append(_InvertedResidual(c, scale(cout), s if i == 0 else 1, t))
                c = scale(cout)
        layers += [*_conv_bn(c, embed_dim, k=1), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


class InputNormalize(nn.Module):
    """pixels in [0, 255] → (pixels / 255 − mean) / std, as one multiply-add so it exports to two ONNX ops."""

    def __init__(self, spec: InputSpec):
        super().__init__()
        mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std))
        self.register_buffer("shift", -mean / std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


class Embedder(nn.Module):
    """What gets exported: decoded pixels (float32 NCHW, 0–255) → embedding [N, D].

    channels_last=True (set by training, off by default and at export) lays the input out in
    channels-last (NHWC) memory; every convolution output then follows, so BatchNorm, max-pooling
    and their backward passes take PyTorch's vectorised NHWC CPU kernels instead of the NCHW ones,
    several times slower at few-shot sizes (benchmarks/layout_speed.py). Same function, same
    parameters: only the activations' strides change."""

    def __init__(self, backbone_name: str, spec: InputSpec, backbone_args: dict | None = None,
                 channels_last: bool = False):
        super().__init__()
        self.channels_last = channels_last
        self.backbone_name, self.backbone_args, self.spec = backbone_name, dict(backbone_args or {}), spec
        self.normalize = InputNormalize(spec)
        self.backbone = create_backbone(backbone_name, in_channels=spec.channels, **self.backbone_args)
        with torch.no_grad():
            was_training = self.backbone.training
            self.backbone.eval()
            self.embed_dim = int(self.backbone(torch.zeros(1, spec.channels, spec.height, spec.width)).shape[1])
            self.backbone.train(was_training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            # .to (not .contiguous): for one-channel input the latter keeps NCHW strides
            x = x.to(memory_format=torch.channels_last)
        return self.backbone(self.normalize(x))


@contextmanager
def nchw_activations(embedder: Embedder):
    """The embedder keeps its input's layout (NCHW) inside the block; the flag is restored after.
    Used where channels-last does not pay or cannot be had: under vmap (which cannot re-stride a
    batched tensor) and on second-order MAML's support pass, whose double backward through
    BatchNorm runs faster in NCHW (measured in docs/benchmarks.md, section 4)."""
    saved, embedder.channels_last = embedder.channels_last, False
    try:
        yield
    finally:
        embedder.channels_last = saved
