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
    hf_fan_in_fan_out = True  # GPT-2's Conv1D stores (in, out)

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
            raise SpecError(
                f"config.json: activation_function {activation!r} is not supported; "
                "aic's gpt2 uses the tanh GELU ('gelu_new')."
            )
        return {
            "n_layer": hf["n_layer"],
            "n_head": hf["n_head"],
            "n_embd": hf["n_embd"],
            "block_size": hf["n_positions"],
            "vocab_size": hf["vocab_size"],
            "tie_embeddings": hf.get("tie_word_embeddings", True),
            "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
        }

    def state_dict_from_hf(
        self, hf_state: dict[str, torch.Tensor], config: TransformerConfig
    ) -> dict[str, torch.Tensor]:
        """Map GPT2LMHeadModel (or GPT2Model) tensors to aic names. HF's Conv1D stores (in, out): transpose."""
        prefix = "transformer." if any(k.startswith("transformer.") for k in hf_state) else ""
        src = {k.removeprefix("transformer."): v for k, v in hf_state.items()}
        # Buffers older transformers versions saved; they are not weights.
        src = {
            k: v
            for k, v in src.items()
            if not (k.endswith(".attn.bias") and v.dim() == 4) and not k.endswith(".attn.masked_bias")
        }
        out: dict[str, torch.Tensor] = {}
        missing: list[str] = []
        for hf_name, name, transpose in _hf_names(config):
            if hf_name not in src:
                missing.append(prefix + hf_name)
            else:
                out[name] = src[hf_name].t().contiguous() if transpose else src[hf_name]
        used = {hf_name for hf_name, _, _ in _hf_names(config)}
        if not config.tie_embeddings:
            if "lm_head.weight" in hf_state:
                out["lm_head.weight"] = hf_state["lm_head.weight"]
            else:
                missing.append("lm_head.weight")
        used.add("lm_head.weight")  # tied: the same tensor as wte, when saved at all
        extra = sorted(set(src) - used)
        if missing or extra:
            raise PluginError(
                f"the GPT-2 checkpoint does not match its config.json ({config.n_layer} layers): missing tensors: "
                f"{', '.join(missing[:10]) or 'none'}; unexpected tensors: "
                f"{', '.join(prefix + e for e in extra[:10]) or 'none'}. It is damaged, "
                "or config.json belongs to another model."
            )
        return pad_vocab(out, config.padded_vocab_size)

    def hf_config(self, options: Any, config: TransformerConfig) -> dict[str, Any]:
        if options.positional.type != "learned":
            raise PluginError(
                f"GPT2LMHeadModel has learned positions only; this model uses '{options.positional.type}' positions, "
                "which the export would lose. Export gpt2 + learned models, or keep this one in aic's format."
            )
        if not options.bias:
            raise PluginError(
                "GPT2LMHeadModel always has biases; this model has bias=false. Its export would hold zero biases that "
                "become trainable in transformers, a different model. Keep this one in aic's format."
            )
        return {
            "architectures": list(self.hf_architectures),
            "model_type": "gpt2",
            "vocab_size": config.vocab_size,
            "n_positions": config.block_size,
            "n_ctx": config.block_size,  # what llama.cpp's convert_hf_to_gguf.py reads as the context length
            "n_embd": config.n_embd,
            "n_layer": config.n_layer,
            "n_head": config.n_head,
            "n_inner": None,
            "activation_function": "gelu_new",
            "resid_pdrop": config.dropout,
            "embd_pdrop": config.dropout,
            "attn_pdrop": config.dropout,
            "layer_norm_epsilon": config.norm_eps,
            "tie_word_embeddings": config.tie_embeddings,
            "dtype": "float32",
        }

    def state_dict_to_hf(self, state: dict[str, torch.Tensor], config: TransformerConfig) -> dict[str, torch.Tensor]:
        out = {}
        for hf_name, name, transpose in _hf_names(config):
            t = state[name]
            if name == "wte.weight":
                t = t[: config.vocab_size]
            out["transformer." + hf_name] = (t.t() if transpose else t).contiguous()
        if not config.tie_embeddings:
            out["lm_head.weight"] = state["lm_head.weight"][: config.vocab_size].contiguous()
        return out

    def hf_linear_map(self, config: TransformerConfig) -> dict[str, list[tuple[str, int, int]]]:
        rows = {
            "attn.qkv": 3 * config.n_embd,
            "attn.proj": config.n_embd,
            "mlp.fc": config.hidden,
            "mlp.proj": config.n_embd,
        }
        out: dict[str, list[tuple[str, int, int]]] = {}
        for hf_name, name, transposed in _hf_names(config):
            if transposed:  # the Conv1D layers: c_attn, c_proj, c_fc
                layer = name.removesuffix(".weight")
                out[layer] = [
                    ("transformer." + hf_name.removesuffix(".weight"), 0, rows[".".join(layer.split(".")[2:])])
                ]
        if not config.tie_embeddings:
            out["lm_head"] = [("lm_head", 0, config.vocab_size)]
        return out


def _hf_names(config: TransformerConfig) -> list[tuple[str, str, bool]]:
    """(HF name without 'transformer.', aic name, transposed) for every GPT-2 tensor but the untied head."""
    names = [("wte.weight", "wte.weight", False), ("wpe.weight", "positional.wpe.weight", False)]
    for i in range(config.n_layer):
        h, b = f"h.{i}.", f"blocks.{i}."
        for part, ours in (("ln_1", "norm1"), ("ln_2", "norm2")):
            names += [
                (h + part + ".weight", b + ours + ".weight", False),
                (h + part + ".bias", b + ours + ".bias", False),
            ]
        for part, ours in (
            ("attn.c_attn", "attn.qkv"),
            ("attn.c_proj", "attn.proj"),
            ("mlp.c_fc", "mlp.fc"),
            ("mlp.c_proj", "mlp.proj"),
        ):
            names += [
                (h + part + ".weight", b + ours + ".weight", True),
                (h + part + ".bias", b + ours + ".bias", False),
            ]
    return names + [("ln_f.weight", "norm_f.weight", False), ("ln_f.bias", "norm_f.bias", False)]


@hookimpl
def aic_register_models(register):
    register(GPT2)
