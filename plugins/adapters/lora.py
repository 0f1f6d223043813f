"""LoRA (Hu et al. 2021): a low-rank update B @ A added to frozen linear layers.

    y = x W^T + b + scaling * dropout(x) A^T B^T,   A (r, in), B (out, r),   scaling = alpha / r
                                                                           (alpha / sqrt(r) with use_rslora)

A starts Kaiming-uniform and B at zero, as PEFT does, so the adapted model starts equal to the base. The
wrapped layer keeps its `weight` and `bias` names, so a base checkpoint loads into it unchanged and the
adapter's own tensors are exactly the `*.lora_A` / `*.lora_B` entries of the state dict.

Targets are module-name patterns matched against the end of each linear layer's name, with `*` as a
wildcard: `attn.qkv` matches `blocks.3.attn.qkv`, `mlp.*` every MLP linear, `blocks.0.*` the first
block's; `all-linear` is every linear layer but the output head (as in PEFT).
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from aic_core.errors import PluginError
from aic_core.hookspecs import hookimpl
from aic_core.kinds import AdapterPlugin, PluginOptions
from aic_core.plan.shape import AdapterLayer, LayerInput

ALL_LINEAR = "all-linear"
OUTPUT_HEAD = "lm_head"


class LoRALinear(nn.Linear):
    """nn.Linear plus a low-rank update; `merge` folds the update into `weight` in place, `unmerge` undoes it
    exactly."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float, use_rslora: bool) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same Parameters: no copy
        self.r = r
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's init of lora_A (nn.Linear's default)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._base_weight: torch.Tensor | None = None  # the unmerged weight, kept while merged

    @property
    def merged(self) -> bool:
        return self._base_weight is not None

    def delta(self) -> torch.Tensor:
        """scaling * B @ A in float64 (the update merge adds; exact to float64 rounding)."""
        return self.scaling * (self.lora_B.double() @ self.lora_A.double())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return y + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self._base_weight = self.weight.detach().clone()
            self.weight.copy_(self._base_weight.double() + self.delta())  # one rounding, to the weight's dtype

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.copy_(self._base_weight)  # bit for bit: no subtraction rounding
            self._base_weight = None

    def plain(self) -> nn.Linear:
        """A plain nn.Linear holding the current (merged, if merged) weight and bias."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scaling={self.scaling:g}"


class LoRAOptions(PluginOptions):
    """Low-rank adapters on linear layers; the base model is frozen and only the adapters train."""

    r: int = Field(8, gt=0, description="Rank of the update.")
    alpha: float = Field(
        16.0, gt=0, description="Scale: the update is multiplied by alpha / r (alpha / sqrt(r) with use_rslora)."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input (training only).")
    targets: list[str] = Field(
        default_factory=lambda: ["attn.qkv", "attn.proj"],
        min_length=1,
        description="Module-name patterns matched against the end of each linear layer's name ('attn.qkv', 'mlp.*', "
        "'blocks.0.*'), or 'all-linear' for every linear layer but the output head.",
    )
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r.")

    @field_validator("targets")
    @classmethod
    def _targets(cls, targets: list[str]) -> list[str]:
        for t in targets:
            if not t or t != t.strip() or t.startswith(".") or t.endswith("."):
                raise ValueError(
                    f"target {t!r} is not a module-name pattern; write e.g. 'attn.qkv', 'mlp.*' or 'all-linear'"
                )
        return targets


def _matches(name: str, pattern: str) -> bool:
    if pattern == ALL_LINEAR:
        return name.split(".")[-1] != OUTPUT_HEAD
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def _regex(patterns: list[str]) -> re.Pattern:
    """`any(_matches(name, p) for p in patterns)` as one regex: `aic plan` asks about every linear layer of models
    that may be 100,000 blocks deep."""
    every = rf"(?!(?:.*\.)?{re.escape(OUTPUT_HEAD)}\Z).*\Z"  # all-linear: any name but the head's
    parts = [every if p == ALL_LINEAR else fnmatch.translate(g) for p in patterns for g in (p, "*." + p)]
    return re.compile("|".join(f"(?:{part})" for part in parts), re.DOTALL)


def linear_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _unmatched(options: LoRAOptions, layers: list[str]) -> None:
    unmatched = [p for p in options.targets if not any(_matches(n, p) for n in layers)]
    if unmatched:
        raise PluginError(
            f"adapter.targets: {', '.join(repr(p) for p in unmatched)} matches no linear layer of this model. "
            f"Its linear layers are: {_layer_kinds(layers)} (in every block: blocks.N.<name>). "
            f"Use one of those, a pattern such as 'mlp.*', or 'all-linear'."
        )


@dataclass(frozen=True)
class LoRALayerPlan(AdapterLayer):
    """What LoRA adds to a wrapped linear layer, for `aic plan`: A (r, in) and B (out, r), trainable; the branch
    saves its input (dropped, with the mask, under dropout; a bf16 copy under autocast) and x A^T (r wide, for B's
    gradient). The backward pass keeps the autocast copy of B always, of A when the input needs a gradient."""

    r: int = 0
    dropout: float = 0.0

    def saved(self, x: LayerInput) -> int:
        element = x.compute_bytes if x.cast else x.bytes
        saved = 0
        if self.dropout > 0:
            if x.requires_grad:
                saved += x.mask_bytes * x.features  # the mask
            saved += element * x.features  # the dropped input, or its bf16 copy
        elif x.cast or not x.saved:
            saved += element * x.features
        return saved + x.compute_bytes * self.r  # x @ A^T, saved by B's matmul

    def weight_copies(self, requires_grad: bool) -> int:
        a, b = self.tensors
        return (a if requires_grad else 0) + b


def _layer_kinds(names: list[str]) -> str:
    """'attn.qkv, attn.proj, ...' with layer indices folded: what a user can write as a target."""
    seen: dict[str, None] = {}
    for n in names:
        parts = n.split(".")
        seen[".".join(parts[2:]) if parts[0] == "blocks" and len(parts) > 2 else n] = None
    return ", ".join(seen)


class LoRA(AdapterPlugin):
    """LoRA on the chosen linear layers (PEFT-compatible initialisation, merge, and export)."""

    name = "lora"
    Options = LoRAOptions

    def apply(self, model: nn.Module, options: LoRAOptions) -> list[str]:
        layers = linear_layers(model)
        _unmatched(options, layers)
        chosen = [n for n in layers if any(_matches(n, p) for p in options.targets)]
        for p in model.parameters():
            p.requires_grad_(False)
        for name in chosen:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(
                parent,
                child,
                LoRALinear(getattr(parent, child), options.r, options.alpha, options.dropout, options.use_rslora),
            )
        return chosen

    def plan_layers(self, options: LoRAOptions, linears: dict[str, tuple[int, int]]) -> dict[str, AdapterLayer]:
        if not all(any(map(_regex([p]).match, linears)) for p in options.targets):
            _unmatched(options, list(linears))  # a pattern matches nothing: say which, as apply does
        match = _regex(options.targets).match
        r, plans = options.r, {}
        for fan_in, fan_out in set(linears.values()):  # one plan per layer shape
            plans[fan_in, fan_out] = LoRALayerPlan(tensors=(r * fan_in, fan_out * r), r=r, dropout=options.dropout)
        return {n: plans[shape] for n, shape in linears.items() if match(n)}

    def wrapped(self, model: nn.Module) -> dict[str, LoRALinear]:
        return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}

    def merge(self, model: nn.Module) -> None:
        for m in self.wrapped(model).values():
            m.merge()

    def unmerge(self, model: nn.Module) -> None:
        for m in self.wrapped(model).values():
            m.unmerge()

    def remove(self, model: nn.Module) -> None:
        for name, m in self.wrapped(model).items():
            m.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, m.plain())

    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {
            f"{name}.{part}": getattr(m, part).detach().to("cpu").contiguous()
            for name, m in self.wrapped(model).items()
            for part in ("lora_A", "lora_B")
        }

    # --- PEFT ---------------------------------------------------------------------------------

    def to_peft(
        self,
        model: nn.Module,
        options: LoRAOptions,
        linear_map: dict[str, list[tuple[str, int, int]]],
        fan_in_fan_out: bool,
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """adapter_config.json and adapter_model.safetensors tensors in PEFT's layout.

        An aic layer that fuses several HF layers (qkv -> q_proj, k_proj, v_proj; fc -> gate_proj, up_proj)
        gives each of them the shared A and its own rows of B: B_i @ A is exactly the fused update's rows."""
        tensors: dict[str, torch.Tensor] = {}
        targets: list[str] = []
        for name, m in self.wrapped(model).items():
            if name not in linear_map:
                raise PluginError(
                    f"the adapted layer {name} has no Hugging Face counterpart, so PEFT cannot hold its adapter"
                )
            a, b = m.lora_A.detach().float().cpu(), m.lora_B.detach().float().cpu()
            for hf_name, start, end in linear_map[name]:
                targets.append(hf_name)
                tensors[f"base_model.model.{hf_name}.lora_A.weight"] = (
                    a.clone()
                )  # shared by a fused layer's parts: one copy each
                tensors[f"base_model.model.{hf_name}.lora_B.weight"] = b[start:end].contiguous()
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": options.r,
            "lora_alpha": options.alpha,
            "lora_dropout": options.dropout,
            "use_rslora": options.use_rslora,
            "target_modules": targets,  # full names: PEFT matches each exactly
            "bias": "none",
            "fan_in_fan_out": fan_in_fan_out,
            "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": None,
            "base_model_name_or_path": None,
        }
        return config, tensors


@hookimpl
def aic_register_adapters(register):
    register(LoRA)
