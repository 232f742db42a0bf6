"""A ResNet-style image classifier on synthetic images: the classic model-parallel experiment
(split a ResNet across two devices, naively and pipelined), run and verified like the
language models.

Single-device code with the same conventions as models/gpt.py: flat stable names (``stem``,
``layers.<i>`` residual blocks, ``head``), ``layers`` a ModuleDict keyed by index, and
``stem``/``head`` None on pipeline stages that do not own them.

Normalization is GroupNorm, not BatchNorm: BatchNorm normalizes with the statistics of the batch
it sees, so under DDP each device normalizes with its own B/N samples (and a pipeline with each
micro-batch's), which is a different computation from the single-device run, not a rounding
difference; its running statistics would also diverge per replica. GroupNorm normalizes each
sample on its own, so every strategy computes the same function and parity holds to rounding.

Shapes: B batch, C channels, H x W image, K classes.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from parallab.models.gpt import load_full_into


@dataclass(frozen=True)
class ResNetConfig:
    image_size: int = 32
    num_classes: int = 10
    widths: tuple[int, ...] = (16, 32, 64, 128)
    blocks: tuple[int, ...] = (2, 2, 2, 2)
    groups: int = 8
    """GroupNorm groups (each width must be divisible by it)."""
    imagenet_stem: bool = False
    """7x7/2 convolution and 3x3/2 max-pool (224-pixel images) instead of one 3x3 convolution."""
    channels: int = 3

    @property
    def n_layers(self) -> int:
        """Residual blocks: the pipeline units."""
        return sum(self.blocks)

    @property
    def seq_len(self) -> int:
        return 1  # one sample is one image: 'tokens' per second = images per second

    vocab_size = None  # not a token model: data comes from make_data


RESNET_PRESETS = {
    "debug": ResNetConfig(image_size=16, num_classes=10, widths=(8, 16, 32, 64), blocks=(1, 1, 1, 1), groups=4),
    "small": ResNetConfig(image_size=32, num_classes=10, widths=(16, 32, 64, 128), blocks=(2, 2, 2, 2), groups=8),
    # ResNet-18's widths and depth, CIFAR-sized images (3x3 stem).
    "resnet18-cifar": ResNetConfig(image_size=32, num_classes=10, widths=(64, 128, 256, 512),
                                   blocks=(2, 2, 2, 2), groups=32),
    "resnet18": ResNetConfig(image_size=224, num_classes=1000, widths=(64, 128, 256, 512),
                             blocks=(2, 2, 2, 2), groups=32, imagenet_stem=True),
}


class ConvNorm(nn.Module):
    def __init__(self, c_in: int, c_out: int, k: int, stride: int, groups: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, bias=False)
        self.norm = nn.GroupNorm(groups, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class Block(nn.Module):
    """Basic residual block: relu(x' + norm(conv(relu(norm(conv(x)))))), x' = x or a strided
    1x1 projection where the width or resolution changes."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int):
        super().__init__()
        self.conv1 = ConvNorm(c_in, c_out, 3, stride, groups)
        self.conv2 = ConvNorm(c_out, c_out, 3, 1, groups)
        self.down = ConvNorm(c_in, c_out, 1, stride, groups) if (stride != 1 or c_in != c_out) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C_in, H, W] -> [B, C_out, H/s, W/s]
        skip = x if self.down is None else self.down(x)
        return F.relu(skip + self.conv2(F.relu(self.conv1(x))))


class Stem(nn.Module):
    def __init__(self, cfg: ResNetConfig):
        super().__init__()
        k, s = (7, 2) if cfg.imagenet_stem else (3, 1)
        self.conv = ConvNorm(cfg.channels, cfg.widths[0], k, s, cfg.groups)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1) if cfg.imagenet_stem else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(F.relu(self.conv(x)))


class Head(nn.Module):
    def __init__(self, cfg: ResNetConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.widths[-1], cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, h, w] -> [B, K]
        return self.fc(x.mean(dim=(2, 3)))


class ResNet(nn.Module):
    def __init__(self, cfg: ResNetConfig):
        super().__init__()
        self.cfg = cfg
        self.stem: Stem | None = Stem(cfg)
        blocks, c_in = [], cfg.widths[0]
        for stage, (width, n) in enumerate(zip(cfg.widths, cfg.blocks)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(Block(c_in, width, stride, cfg.groups))
                c_in = width
        self.layers = nn.ModuleDict({str(i): b for i, b in enumerate(blocks)})
        self.head: Head | None = Head(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> logits [B, K]; middle stages pass feature maps."""
        if self.stem is not None:
            x = self.stem(x)
        for layer in self.layers.values():
            x = layer(x)
        if self.head is not None:
            x = self.head(x)
        return x

    @torch.no_grad()
    def init_weights(self, generator_for) -> None:
        """He (fan-out) normal for convolutions, normal(0, 0.01) for the classifier, norms 1,
        biases 0; each parameter from the generator of its name."""
        for name, p in self.named_parameters():
            module_path, kind = name.rsplit(".", 1)
            if kind == "bias":
                values = torch.zeros(p.shape)
            elif module_path.endswith("norm"):
                values = torch.ones(p.shape)
            elif p.dim() == 4:
                fan_out = p.shape[0] * p.shape[2] * p.shape[3]
                values = torch.randn(p.shape, generator=generator_for(name)) * math.sqrt(2.0 / fan_out)
            else:
                values = torch.randn(p.shape, generator=generator_for(name)) * 0.01
            load_full_into(p, values)


class SyntheticImages:
    """Images [B, 3, H, W] and labels [B]: each class has a fixed random pattern (from the
    seed), each sample is its class's pattern plus noise, so the task is learnable. Row r of a
    step's global batch comes from a generator seeded by (seed, step, r): any data-parallel
    split of the batch gives the same rows as one device."""

    def __init__(self, cfg: ResNetConfig, global_batch: int, seed: int):
        self.cfg, self.global_batch, self.seed = cfg, int(global_batch), int(seed)
        rng = np.random.default_rng([self.seed, 1_000_003])
        shape = (cfg.num_classes, cfg.channels, cfg.image_size, cfg.image_size)
        self.patterns = rng.standard_normal(shape, dtype=np.float32)

    def batch(self, step: int, *, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        if self.global_batch % world:
            raise ValueError(f"global_batch {self.global_batch} is not divisible by the "
                             f"data-parallel world size {world}")
        b = self.global_batch // world
        c = self.cfg
        x = np.empty((b, c.channels, c.image_size, c.image_size), dtype=np.float32)
        y = np.empty(b, dtype=np.int64)
        for i in range(b):
            rng = np.random.default_rng([self.seed, step, rank * b + i])
            y[i] = rng.integers(0, c.num_classes)
            x[i] = self.patterns[y[i]] + rng.standard_normal(x.shape[1:], dtype=np.float32)
        return torch.from_numpy(x), torch.from_numpy(y)


class ResNetFamily:
    name = "resnet"
    presets = list(RESNET_PRESETS)

    def config(self, preset: str, overrides: dict) -> ResNetConfig:
        if preset not in RESNET_PRESETS:
            raise ValueError(f"unknown model preset '{preset}' for resnet (valid: {', '.join(RESNET_PRESETS)})")
        over = dict(overrides)
        if "n_layers" in over:  # blocks per resolution, e.g. 2 = ResNet-18's layout
            over["blocks"] = (over.pop("n_layers"),) * len(RESNET_PRESETS[preset].widths)
        if over:
            raise ValueError(f"unknown model setting(s) {sorted(over)} for resnet (valid: n_layers, "
                             "as blocks per resolution; the rest comes from the preset)")
        cfg = replace(RESNET_PRESETS[preset], **over)
        if any(w % cfg.groups for w in cfg.widths):
            raise ValueError(f"resnet widths {cfg.widths} must be divisible by groups={cfg.groups}")
        return cfg

    def build(self, cfg: ResNetConfig) -> ResNet:
        return ResNet(cfg)

    def _counted(self, cfg: ResNetConfig) -> dict:
        from parallab.models.flops import count_flops
        from parallab.models.registry import build_meta

        x = torch.zeros(1, cfg.channels, cfg.image_size, cfg.image_size, device="meta")
        y = torch.zeros(1, dtype=torch.long, device="meta")
        return count_flops(build_meta(self, cfg), x, y, self.loss, key=("resnet", cfg), per_module=True)

    def pipeline_units(self, cfg: ResNetConfig):
        """One unit per residual block, weighted by its counted forward FLOPs per image (the
        early high-resolution blocks cost as much as the late wide ones); the stem is charged
        to the first block, the head to the last."""
        from parallab.models.registry import PipelineUnit

        by = self._counted(cfg)["by_module"]
        units = [PipelineUnit(f"layers.{i}", float(by.get(f"layers.{i}", 0)) + 1.0)
                 for i in range(cfg.n_layers)]
        units[0] = PipelineUnit(units[0].name, units[0].flops_per_token + by.get("stem", 0))
        units[-1] = PipelineUnit(units[-1].name, units[-1].flops_per_token + by.get("head", 0))
        return units

    def make_stage(self, model: ResNet, units: list[str], *, first: bool, last: bool) -> ResNet:
        stage = copy.deepcopy(model)
        keep = {u.split(".", 1)[1] for u in units}
        for key in list(stage.layers.keys()):
            if key not in keep:
                del stage.layers[key]
        if not first:
            stage.stem = None
        if not last:
            stage.head = None
        return stage

    def tp_plan(self, cfg: ResNetConfig) -> dict[str, str]:
        return {}

    def check(self, cfg: ResNetConfig, *, mode: str, parallel) -> None:
        if mode == "infer":
            raise ValueError("parallab's inference measures token forward passes and generation; "
                             "model resnet is an image classifier (use parallab train/sweep with "
                             "sweep.modes train)")
        if parallel.strategy in ("tp", "fsdp+tp"):
            raise ValueError("model resnet has no tensor-parallel plan (convolutions with small "
                             "weights and large activations: splitting them buys little); use "
                             "ddp, fsdp or pipeline")

    def make_data(self, cfg: ResNetConfig, global_batch: int, seed: int) -> SyntheticImages:
        return SyntheticImages(cfg, global_batch, seed)

    def flops_per_sample(self, cfg: ResNetConfig, *, training: bool = True) -> float:
        return float(self._counted(cfg)["training" if training else "forward"])

    def flops_per_token(self, cfg: ResNetConfig, *, training: bool) -> float:
        return self.flops_per_sample(cfg, training=training)  # seq_len = 1

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy: logits [B, K], labels [B]."""
        return F.cross_entropy(logits.float(), targets)
