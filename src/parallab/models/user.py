"""A user's own module as a parallab model family: ``--model.name user --model.entry
package.module:build`` or ``--model.entry path/to/file.py:build`` (docs/MODELS.md).

``build()`` (or ``build(preset)``, given ``model.preset``) returns an ``nn.Module``, or a dict /
dataclass / object with ``module`` and optionally:

* ``split_points``: names of children of an ``nn.Sequential`` module where a pipeline stage may
  begin (without them the stages are cut by parameter count);
* ``tp_plan``: {module path pattern: style} for tensor parallelism (parallel/tp.py styles);
* ``loss``: ``loss(output, target) -> scalar`` (default: cross-entropy over the last dim);
* ``make_batch``: ``make_batch(step, rank, world) -> (x, y)``, this rank's rows of the step's
  global batch (also given ``batch=`` and ``seed=`` when its signature names them); without
  it the module gets token batches [B, seq_len] of ids below ``vocab_size`` (256 and 64 unless
  given), like the built-in language models;
* ``vocab_size``, ``seq_len``: for those token batches.

``build`` runs under ``torch.device("meta")`` (nothing is allocated); parameters are then
initialized per rank by name from the run's seed: by the module's own
``init_weights(generator_for)`` when it has one (the built-in models' contract), else matrices
normal(0, 1/sqrt(fan_in)), 1-D weights of norms 1, other vectors and biases 0.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from parallab.models.gpt import load_full_into

SPEC_KEYS = ("module", "split_points", "tp_plan", "loss", "make_batch", "vocab_size", "seq_len")


@dataclass
class UserModel:
    """What ``build`` may return besides a bare module (a dict with these keys works too)."""
    module: nn.Module
    split_points: list[str] | None = None
    tp_plan: dict[str, str] | None = None
    loss: Callable | None = None
    make_batch: Callable | None = None
    vocab_size: int | None = None
    seq_len: int | None = None


@dataclass(frozen=True)
class UserConfig:
    entry: str
    preset: str
    n_layers: int
    """Pipeline units: groups of children between split points (1 for a non-Sequential)."""
    seq_len: int
    """Tokens per sample for token batches; 1 with the user's own batches."""
    vocab_size: int | None
    has_plan: bool
    sequential: bool
    own_batches: bool
    tie_embeddings: bool = False


def _load_function(entry: str) -> Callable:
    target, sep, func = entry.rpartition(":")
    if not sep or not target or not func:
        raise ValueError(f"model.entry '{entry}' must be package.module:function or "
                         "path/to/file.py:function")
    try:
        if target.endswith(".py") or "/" in target or "\\" in target:
            path = Path(target).resolve()
            if not path.is_file():
                raise ValueError(f"model.entry file '{target}' does not exist")
            name = "parallab_user_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
            module = sys.modules.get(name)
            if module is None:
                spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ImportError as e:
        raise ValueError(f"model.entry '{entry}': cannot import '{target}' ({e})") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        raise ValueError(f"model.entry '{entry}': '{target}' has no function '{func}'")
    return fn


def load_spec(entry: str, preset: str) -> UserModel:
    """Call the user's build (on meta) and normalize what it returns."""
    fn = _load_function(entry)
    with torch.device("meta"):
        out = fn(preset) if inspect.signature(fn).parameters else fn()
    if isinstance(out, nn.Module):
        return UserModel(module=out)
    data = out if isinstance(out, dict) else {k: getattr(out, k) for k in SPEC_KEYS if hasattr(out, k)}
    bad = sorted(set(data) - set(SPEC_KEYS))
    if bad or not isinstance(data.get("module"), nn.Module):
        raise ValueError(f"model.entry '{entry}' must return an nn.Module or a dict/dataclass with "
                         f"an nn.Module 'module' and optionally {', '.join(SPEC_KEYS[1:])}"
                         + (f" (unknown: {bad})" if bad else ""))
    return UserModel(**data)


def _is_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _groups(spec: UserModel) -> list[list[str]]:
    """Children of a Sequential grouped by the split points (one group per child without)."""
    names = list(spec.module._modules)
    if not spec.split_points:
        return [[n] for n in names]
    unknown = [s for s in spec.split_points if s not in names]
    if unknown or names and spec.split_points and names[0] in spec.split_points:
        raise ValueError(f"split_points {list(spec.split_points)} must name children of the "
                         f"Sequential other than the first (children: {names})")
    groups: list[list[str]] = [[]]
    for n in names:
        if n in spec.split_points:
            groups.append([])
        groups[-1].append(n)
    return groups


class UserFamily:
    name = "user"
    presets: list[str] = []

    def __init__(self):
        self._specs: dict[tuple[str, str], UserModel] = {}
        self._loss: Callable | None = None

    def spec(self, cfg: UserConfig) -> UserModel:
        key = (cfg.entry, cfg.preset)
        if key not in self._specs:
            self._specs[key] = load_spec(cfg.entry, cfg.preset)
        return self._specs[key]

    def config(self, preset: str, overrides: dict) -> UserConfig:
        over = dict(overrides)
        entry = over.pop("entry", None)
        if entry is None:
            raise ValueError("model user needs model.entry: package.module:build or path/to/file.py:build")
        if over:
            raise ValueError(f"unknown model setting(s) {sorted(over)} for model user (valid: entry; "
                             "shapes are the module's own)")
        spec = self._specs.get((entry, preset)) or load_spec(entry, preset)
        self._specs[(entry, preset)] = spec
        sequential = _is_sequential(spec.module)
        if spec.split_points and not sequential:
            raise ValueError(f"split_points need the module to be an nn.Sequential (stages are runs of "
                             f"its children); model.entry '{entry}' returned {type(spec.module).__name__}")
        own = spec.make_batch is not None
        self._loss = spec.loss
        return UserConfig(entry=entry, preset=preset,
                          n_layers=len(_groups(spec)) if sequential else 1,
                          seq_len=1 if own else int(spec.seq_len or 64),
                          vocab_size=None if own else int(spec.vocab_size or 256),
                          has_plan=bool(spec.tp_plan), sequential=sequential, own_batches=own)

    def build(self, cfg: UserConfig) -> nn.Module:
        # The user's build ran once (on meta, in config); each build is a fresh copy of it.
        return copy.deepcopy(self.spec(cfg).module)

    def pipeline_units(self, cfg: UserConfig):
        """One unit per group of children (between split points), weighted by its parameter
        count: without shapes, the best cheap stand-in for its cost."""
        from parallab.models.registry import PipelineUnit

        module = self.spec(cfg).module
        return [PipelineUnit("+".join(g), 1.0 + sum(p.numel() for n in g
                                                   for p in module._modules[n].parameters()))
                for g in _groups(self.spec(cfg))]

    def make_stage(self, model: nn.Module, units: list[str], *, first: bool, last: bool) -> nn.Module:
        """The Sequential with only this stage's children, under their own names (deleting
        from ``_modules`` directly: ``del seq[i]`` would renumber the rest)."""
        stage = copy.deepcopy(model)
        keep = {n for u in units for n in u.split("+")}
        for name in list(stage._modules):
            if name not in keep:
                del stage._modules[name]
        return stage

    def tp_plan(self, cfg: UserConfig) -> dict[str, str]:
        return dict(self.spec(cfg).tp_plan or {})

    def check(self, cfg: UserConfig, *, mode: str, parallel) -> None:
        from parallab.config import uses_pipeline, uses_tp

        s = parallel.strategy
        if mode == "infer":
            raise ValueError("inference (forward and KV-cache generation) needs a parallab language "
                             "model; model user is trained only (use parallab train/sweep with "
                             "sweep.modes train)")
        if uses_tp(s) and not cfg.has_plan:
            raise ValueError(f"strategy {s} needs a tensor-parallel plan: return tp_plan={{module "
                             f"pattern: style}} (colwise, rowwise, ...) from {cfg.entry}")
        if uses_tp(s) and parallel.sequence_parallel:
            raise ValueError("sequence parallelism is not supported for model user")
        if uses_pipeline(s) and not cfg.sequential:
            raise ValueError(f"strategy {s} needs the module to be an nn.Sequential (stages are runs "
                             f"of its children, cut at split_points); {cfg.entry} returned "
                             f"{type(self.spec(cfg).module).__name__}")
        if parallel.activation_checkpointing and not isinstance(getattr(self.spec(cfg).module, "layers", None),
                                                                nn.ModuleDict):
            raise ValueError("activation checkpointing needs the module's blocks in a 'layers' "
                             "ModuleDict (the unit it checkpoints); set activation_checkpointing=false")

    def make_data(self, cfg: UserConfig, global_batch: int, seed: int):
        fn = self.spec(cfg).make_batch
        return None if fn is None else UserBatches(fn, global_batch, seed)

    @torch.no_grad()
    def init_weights(self, model: nn.Module, generator_for) -> None:
        own = getattr(model, "init_weights", None)
        if callable(own):
            own(generator_for)
            return
        for mod_name, module in model.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                name = f"{mod_name}.{pname}" if mod_name else pname
                if p.dim() >= 2:
                    fan_in = p[0].numel()
                    values = torch.randn(p.shape, generator=generator_for(name)) / fan_in ** 0.5
                elif pname == "weight" and "norm" in type(module).__name__.lower():
                    values = torch.ones(p.shape)
                else:
                    values = torch.zeros(p.shape)
                load_full_into(p, values)

    def _sample(self, cfg: UserConfig):
        fn = self.spec(cfg).make_batch
        if fn is None:
            x = torch.zeros(1, cfg.seq_len, dtype=torch.long)
            return x, x
        x, y = UserBatches(fn, 1, 0).batch(0)
        return x[:1], y[:1]

    def flops_per_sample(self, cfg: UserConfig, *, training: bool = True) -> float:
        """Counted (FlopCounterMode on meta) on the first sample of the user's batches."""
        from parallab.models.flops import count_flops

        x, y = self._sample(cfg)
        counted = count_flops(self.build(cfg), x, y, self.loss_for(cfg), key=("user", cfg))
        return float(counted["training" if training else "forward"])

    def flops_per_token(self, cfg: UserConfig, *, training: bool) -> float:
        return self.flops_per_sample(cfg, training=training) / cfg.seq_len

    def loss_for(self, cfg: UserConfig) -> Callable:
        return self.spec(cfg).loss or default_loss

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss of the module configured last in this process (a rank runs one model;
        ``family.loss`` takes no config), else cross-entropy."""
        return (self._loss or default_loss)(logits, targets)


def default_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the last dimension: [..., K] scores, [...] class ids."""
    return F.cross_entropy(output.reshape(-1, output.shape[-1]).float(), target.reshape(-1))


class UserBatches:
    """The user's batch maker behind the trainer's data interface."""

    def __init__(self, fn: Callable, global_batch: int, seed: int):
        self.fn, self.global_batch, self.seed = fn, int(global_batch), int(seed)
        params = inspect.signature(fn).parameters
        self.extra = {k: v for k, v in (("batch", self.global_batch), ("seed", self.seed)) if k in params}

    def batch(self, step: int, *, rank: int = 0, world: int = 1):
        x, y = self.fn(step, rank, world, **self.extra)
        return x, y
