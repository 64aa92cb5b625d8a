"""Built-in architectures, each registered in the `model` namespace by one line at its factory.

Every built module carries `input_shape`: the shape of ONE input sample (no batch dimension).
`example_input` turns it into a batch, so code that needs a dummy input never hard-codes shapes:

>>> from nncompress.core import lookup
>>> model = lookup("resnet20", namespace="model")(num_classes=10)
>>> model.input_shape
(3, 32, 32)
>>> tuple(model.eval()(example_input(model, batch=2)).shape)
(2, 10)
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..core import ModelLoadError, lookup, register
from ..core.errors import RegistryError

__all__ = ["BasicBlock", "InvertedResidual", "MLP", "MNIST1DCNN", "MobileNetV2", "ResNetCifar", "VGG",
           "example_input", "mlp", "mnist1d_cnn", "mobilenetv2", "resnet20", "resnet56", "vgg11"]


def example_input(model: nn.Module | str, kwargs: dict[str, Any] | None = None, batch: int = 1,
                  seed: int = 0) -> torch.Tensor:
    """A seeded standard-normal batch `(batch, *model.input_shape)` for a built module or a model name.

    A name is built with `kwargs` (through the `model` registry) just to read its `input_shape`.

    >>> tuple(example_input("mnist1d_cnn", batch=4).shape)
    (4, 40)
    """
    if isinstance(model, str):
        try:
            factory = lookup(model, namespace="model")
        except RegistryError as e:
            raise ModelLoadError(str(e)) from None
        model = factory(**(kwargs or {}))
    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise ModelLoadError(f"{type(model).__name__} has no input_shape; set model.input_shape to the "
                             f"shape of one sample, e.g. (3, 32, 32)")
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *shape), generator=gen)


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn plus a shortcut (identity, or 1x1 conv + bn when shape changes), relu.

    `dim` picks 1-D (`Conv1d`, inputs (N, C, L)) or 2-D (`Conv2d`, inputs (N, C, H, W)) layers.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, dim: int = 2, kernel_size: int = 3):
        super().__init__()
        conv, bn = (nn.Conv1d, nn.BatchNorm1d) if dim == 1 else (nn.Conv2d, nn.BatchNorm2d)
        pad = kernel_size // 2
        self.conv1 = conv(in_ch, out_ch, kernel_size, stride=stride, padding=pad, bias=False)
        self.bn1 = bn(out_ch)
        self.relu1 = nn.ReLU()
        self.conv2 = conv(out_ch, out_ch, kernel_size, stride=1, padding=pad, bias=False)
        self.bn2 = bn(out_ch)
        if stride != 1 or in_ch != out_ch:  # option B: a projection, so widths stay independent
            self.shortcut = nn.Sequential(conv(in_ch, out_ch, 1, stride=stride, bias=False), bn(out_ch))
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))  # (N, out, L/s) or (N, out, H/s, W/s)
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class MNIST1DCNN(nn.Module):
    """Residual 1-D CNN for MNIST-1D: stem conv, residual stages, global average pool, linear head.

    Input (N, 40) or (N, 1, 40) floats; output (N, num_classes) logits.
    """

    def __init__(self, length: int = 40, num_classes: int = 10, widths: tuple[int, ...] = (64, 128, 128),
                 stem_kernel: int = 5):
        super().__init__()
        self.input_shape = (length,)
        self.stem = nn.Sequential(nn.Conv1d(1, widths[0], stem_kernel, padding=stem_kernel // 2, bias=False),
                                  nn.BatchNorm1d(widths[0]), nn.ReLU())
        blocks, in_ch = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(BasicBlock(in_ch, w, stride=1 if i == 0 else 2, dim=1))
            in_ch = w
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)  # (N, L) -> (N, 1, L)
        x = self.layers(self.stem(x))  # (N, C, L / 2**(stages-1))
        return self.fc(self.pool(x).flatten(1))  # (N, C) -> (N, classes)


@register("mnist1d_cnn", namespace="model")
def mnist1d_cnn(num_classes: int = 10, widths: tuple[int, ...] = (64, 128, 128), length: int = 40) -> MNIST1DCNN:
    """The MNIST-1D reference CNN (~205k parameters at the default widths).

    >>> tuple(mnist1d_cnn().eval()(torch.zeros(2, 40)).shape)
    (2, 10)
    """
    return MNIST1DCNN(length=length, num_classes=num_classes, widths=tuple(widths))


class MLP(nn.Module):
    """Linear-ReLU stack; inputs are flattened to (N, in_features)."""

    def __init__(self, in_features: int = 40, hidden: tuple[int, ...] = (256, 256), num_classes: int = 10):
        super().__init__()
        self.input_shape = (in_features,)
        layers: list[nn.Module] = []
        prev = in_features
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU()]
            prev = h
        layers.append(nn.Linear(prev, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))  # (N, in_features) -> (N, classes)


@register("mlp", namespace="model")
def mlp(in_features: int = 40, hidden: tuple[int, ...] = (256, 256), num_classes: int = 10) -> MLP:
    """A multi-layer perceptron.

    >>> tuple(mlp(in_features=64).eval()(torch.zeros(3, 64)).shape)
    (3, 10)
    """
    return MLP(in_features=in_features, hidden=tuple(hidden), num_classes=num_classes)


class ResNetCifar(nn.Module):
    """CIFAR ResNet (He et al. 2016, section 4.2): 3 stages of `n` basic blocks, widths 16/32/64."""

    def __init__(self, n: int, in_channels: int = 3, num_classes: int = 10, size: int = 32):
        super().__init__()
        self.input_shape = (in_channels, size, size)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        stages, in_ch = [], 16
        for i, w in enumerate((16, 32, 64)):
            blocks = [BasicBlock(in_ch if j == 0 else w, w, stride=2 if (i > 0 and j == 0) else 1) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            in_ch = w
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (N, 16, H, W)
        x = self.layer3(self.layer2(self.layer1(x)))  # (N, 64, H/4, W/4)
        return self.fc(self.pool(x).flatten(1))  # (N, classes)


@register("resnet20", namespace="model")
def resnet20(in_channels: int = 3, num_classes: int = 10) -> ResNetCifar:
    """ResNet-20 for 32x32 images (3 blocks per stage, option-B shortcuts).

    >>> tuple(resnet20().eval()(torch.zeros(1, 3, 32, 32)).shape)
    (1, 10)
    """
    return ResNetCifar(3, in_channels=in_channels, num_classes=num_classes)


@register("resnet56", namespace="model")
def resnet56(in_channels: int = 3, num_classes: int = 10) -> ResNetCifar:
    """ResNet-56 for 32x32 images (9 blocks per stage, option-B shortcuts).

    >>> sum(p.numel() for p in resnet56().parameters()) > 800_000
    True
    """
    return ResNetCifar(9, in_channels=in_channels, num_classes=num_classes)


def _make_divisible(v: float, divisor: int = 8) -> int:
    # MobileNet convention: widths are multiples of 8 and never drop more than 10% below v
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection; residual when shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int):
        super().__init__()
        hidden = in_ch * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(in_ch, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
                   nn.BatchNorm2d(hidden), nn.ReLU6(),
                   nn.Conv2d(hidden, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch)]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)  # (N, out, H/s, W/s)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 inputs: stride-1 stem and stride 1 in the second stage (CIFAR variant)."""

    # (expansion t, channels c, repeats n, first stride s), as in Sandler et al. 2018, table 2
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))

    def __init__(self, width_mult: float = 1.0, in_channels: int = 3, num_classes: int = 10, size: int = 32):
        super().__init__()
        self.input_shape = (in_channels, size, size)
        stem = _make_divisible(32 * width_mult)
        last = _make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(in_channels, stem, 3, padding=1, bias=False),
                                                 nn.BatchNorm2d(stem), nn.ReLU6())]
        in_ch = stem
        for t, c, n, s in self.SETTINGS:
            out_ch = _make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
        layers.append(nn.Sequential(nn.Conv2d(in_ch, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6()))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (N, last, H/8, W/8)
        return self.classifier(self.pool(x).flatten(1))  # (N, classes)


@register("mobilenetv2", namespace="model")
def mobilenetv2(width_mult: float = 1.0, in_channels: int = 3, num_classes: int = 10) -> MobileNetV2:
    """MobileNetV2-style network for 32x32 images.

    >>> tuple(mobilenetv2(width_mult=0.5).eval()(torch.zeros(1, 3, 32, 32)).shape)
    (1, 10)
    """
    return MobileNetV2(width_mult=width_mult, in_channels=in_channels, num_classes=num_classes)


class VGG(nn.Module):
    """VGG with BatchNorm for 32x32 inputs: 3x3 conv-bn-relu blocks and max pools, one linear head."""

    def __init__(self, cfg: tuple[int | str, ...], in_channels: int = 3, num_classes: int = 10, size: int = 32):
        super().__init__()
        self.input_shape = (in_channels, size, size)
        layers: list[nn.Module] = []
        in_ch = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(in_ch, int(v), 3, padding=1, bias=False), nn.BatchNorm2d(int(v)), nn.ReLU()]
                in_ch = int(v)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (N, C, 1, 1) for 32x32 inputs after five pools
        return self.classifier(self.pool(x).flatten(1))  # (N, classes)


@register("vgg11", namespace="model")
def vgg11(width: int = 64, in_channels: int = 3, num_classes: int = 10) -> VGG:
    """VGG-11 (configuration A) with BatchNorm for 32x32 images; `width` scales every layer (64: 9.2M params).

    >>> tuple(vgg11(width=8).eval()(torch.zeros(1, 3, 32, 32)).shape)
    (1, 10)
    """
    w = width
    cfg = (w, "M", 2 * w, "M", 4 * w, 4 * w, "M", 8 * w, 8 * w, "M", 8 * w, 8 * w, "M")
    return VGG(cfg, in_channels=in_channels, num_classes=num_classes)
