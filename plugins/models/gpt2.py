"""GPT-2 and its family: LayerNorm, GELU MLP, biases, tied embeddings."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from aic_core.errors import PluginError, SpecError
from aic_core.hookspecs import hookimpl
from aic_core.kinds import ModelPlugin, PluginOptions
from aic_core.nn.transformer import TransformerConfig
from aic_plugins.models.presets import fill_from_preset, pad_vocab

PRESETS: dict[str, dict[str, int]] = {
    "gpt2-small": {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024},  # 124M with vocab 50257
    "gpt2-medium": {"n_layer": 24, "n_head": 16, "n_embd": 1024, "block_size": 1024},  # 350M
    "gpt2-large": {"n_layer": 36, "n_head": 20, "n_embd": 1280, "block_size": 1024},  # 774M
    "gpt2-xl": {"n_layer": 48, "n_head": 25, "n_embd": 1600, "block_size": 1024},  # 1558M
}
SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size")


class GPT2Options(PluginOptions):
    """A GPT-2 shape: pick a preset, set the fields, or both (fields override the preset)."""

    preset: Literal["gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl"] | None = None
    n_layer: int | None = Field(None, gt=0)
    n_head: int | None = Field(None, gt=0)
    n_embd: int | None = Field(None, gt=0)
    block_size: int | None = Field(None, gt=1, description="Context length.")
    vocab_size: int | None = Field(None, gt=0, description="Default: the tokenizer's vocabulary size.")
    bias: bool = True
    dropout: float = Field(0.0, ge=0, lt=1)
    tie_embeddings: bool = True
    norm_eps: float = Field(1e-5, gt=0)

    @model_validator(mode="after")
    def _fill_from_preset(self) -> GPT2Options:
        fill_from_preset(self, PRESETS, SHAPE_FIELDS)
        return self


class GPT2(ModelPlugin):
    name = "gpt2"
    Options = GPT2Options
    default_positional = "learned"
    hf_architectures = ("GPT2LMHeadModel",)

    def config(self, options: GPT2Options, vocab_size: int) -> TransformerConfig:
        return TransformerConfig(
            vocab_size=options.vocab_size or vocab_size,
            block_size=options.block_size,
            n_layer=options.n_layer,
            n_head=options.n_head,
            n_embd=options.n_embd,
            bias=options.bias,
            dropout=options.dropout,
            tie_embeddings=options.tie_embeddings,
            norm_eps=options.norm_eps,
        )

    # --- Hugging Face GPT2LMHeadModel ----------------------------------------------------------

    def options_from_hf_config(self, hf: dict[str, Any]) -> dict[str, Any]:
        activation = hf.get("activation_function", "gelu_new")
        if activation not in ("gelu_new", "gelu_pytorch_tanh"):
            raise SpecError(f"config.json: activation_function {activation!r} is not supported; aic's gpt2 uses the tanh GELU ('gelu_new').")
        return {
            "n_layer": hf["n_layer"],
            "n_head": hf["n_head"],
            "n_embd": hf["n_embd"],
            "block_size": hf["n_positions"],
            "vocab_size": hf["vocab_size"],
            "tie_embeddings": hf.get("tie_word_embeddings", True),
            "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
        }

    def state_dict_from_hf(self, hf_state: dict[str, torch.Tensor], config: TransformerConfig) -> dict[str, torch.Tensor]:
        """Map GPT2LMHeadModel (or GPT2Model) tensors to aic names. HF's Conv1D stores (in, out): transpose."""
        src = {k.removeprefix("transformer."): v for k, v in hf_state.items()}
        # Buffers older transformers versions saved; they are not weights.
        src = {k: v for k, v in src.items() if not (k.endswith(".attn.bias") and v.dim() == 4) and not k.endswith(".attn.masked_bias")}
        out: dict[str, torch.Tensor] = {}
        used: set[str] = set()

        def take(hf_name: str, name: str, transpose: bool = False) -> None:
            if hf_name not in src:
                return
            t = src[hf_name]
            out[name] = t.t().contiguous() if transpose else t
            used.add(hf_name)

        take("wte.weight", "wte.weight")
        take("wpe.weight", "positional.wpe.weight")
        for i in range(config.n_layer):
            h, b = f"h.{i}.", f"blocks.{i}."
            for part, ours in (("ln_1", "norm1"), ("ln_2", "norm2")):
                take(h + part + ".weight", b + ours + ".weight")
                take(h + part + ".bias", b + ours + ".bias")
            for part, ours in (("attn.c_attn", "attn.qkv"), ("attn.c_proj", "attn.proj"), ("mlp.c_fc", "mlp.fc"), ("mlp.c_proj", "mlp.proj")):
                take(h + part + ".weight", b + ours + ".weight", transpose=True)
                take(h + part + ".bias", b + ours + ".bias")
        take("ln_f.weight", "norm_f.weight")
        take("ln_f.bias", "norm_f.bias")
        if config.tie_embeddings:
            used.add("lm_head.weight")  # tied: the same tensor as wte
        else:
            if "lm_head.weight" in hf_state:
                out["lm_head.weight"] = hf_state["lm_head.weight"]
                used.add("lm_head.weight")
        extra = sorted(set(src) - used)
        if extra:
            raise PluginError(f"unexpected tensors in the GPT-2 checkpoint (not part of a {config.n_layer}-layer GPT-2): {', '.join(extra[:10])}")
        return pad_vocab(out, config.padded_vocab_size)


@hookimpl
def aic_register_models(register):
    register(GPT2)
