"""The Llama family (TinyLlama): RMSNorm, SwiGLU MLP, grouped-query attention, no biases, RoPE."""

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
    # TinyLlama 1.1B; its published vocabulary is 32000 (aic takes the vocabulary from the tokenizer
    # unless vocab_size is set).
    "tinyllama-1.1b": {
        "n_layer": 22,
        "n_head": 32,
        "n_kv_head": 4,
        "n_embd": 2048,
        "mlp_hidden": 5632,
        "block_size": 2048,
    },
    # A small shape of the same family that trains on a CPU.
    "llama-mini": {"n_layer": 4, "n_head": 8, "n_kv_head": 2, "n_embd": 256, "mlp_hidden": 704, "block_size": 256},
}
SHAPE_FIELDS = ("n_layer", "n_head", "n_kv_head", "n_embd", "mlp_hidden", "block_size")


class LlamaOptions(PluginOptions):
    """A Llama shape: pick a preset, set the fields, or both (fields override the preset)."""

    preset: Literal["tinyllama-1.1b", "llama-mini"] | None = None
    n_layer: int | None = Field(None, gt=0)
    n_head: int | None = Field(None, gt=0)
    n_kv_head: int | None = Field(
        None, gt=0, description="Key/value heads (grouped-query attention); must divide n_head."
    )
    n_embd: int | None = Field(None, gt=0)
    mlp_hidden: int | None = Field(None, gt=0, description="Width of the SwiGLU MLP.")
    block_size: int | None = Field(None, gt=1, description="Context length.")
    vocab_size: int | None = Field(None, gt=0, description="Default: the tokenizer's vocabulary size.")
    dropout: float = Field(0.0, ge=0, lt=1)
    tie_embeddings: bool = False
    norm_eps: float = Field(1e-5, gt=0)

    @model_validator(mode="after")
    def _fill_from_preset(self) -> LlamaOptions:
        fill_from_preset(self, PRESETS, SHAPE_FIELDS)
        if self.n_head % self.n_kv_head:
            ok = [k for k in range(1, self.n_head + 1) if self.n_head % k == 0]
            raise ValueError(
                f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head}): each KV head serves "
                f"a whole group of query heads. n_kv_head can be one of {ok}"
            )
        return self


class Llama(ModelPlugin):
    name = "llama"
    Options = LlamaOptions
    default_positional = "rope"
    hf_architectures = ("LlamaForCausalLM",)

    def config(self, options: LlamaOptions, vocab_size: int) -> TransformerConfig:
        return TransformerConfig(
            vocab_size=options.vocab_size or vocab_size,
            block_size=options.block_size,
            n_layer=options.n_layer,
            n_head=options.n_head,
            n_kv_head=options.n_kv_head,
            n_embd=options.n_embd,
            mlp_hidden=options.mlp_hidden,
            mlp="swiglu",
            norm="rmsnorm",
            norm_eps=options.norm_eps,
            bias=False,
            dropout=options.dropout,
            tie_embeddings=options.tie_embeddings,
        )

    # --- Hugging Face LlamaForCausalLM ---------------------------------------------------------

    def options_from_hf_config(self, hf: dict[str, Any]) -> dict[str, Any]:
        for key, allowed in (("hidden_act", ("silu",)), ("attention_bias", (False, None)), ("mlp_bias", (False, None))):
            if hf.get(key) not in allowed:
                raise SpecError(
                    f"config.json: {key}={hf.get(key)!r} is not supported by aic's llama (it needs {allowed[0]!r})."
                )
        n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or n_embd // n_head
        if head_dim * n_head != n_embd:
            raise SpecError(
                f"config.json: head_dim {head_dim} x {n_head} heads != hidden_size {n_embd}; "
                "aic's llama needs head_dim = hidden_size / num_attention_heads."
            )
        return {
            "n_layer": hf["num_hidden_layers"],
            "n_head": n_head,
            "n_kv_head": hf.get("num_key_value_heads") or n_head,
            "n_embd": n_embd,
            "mlp_hidden": hf["intermediate_size"],
            "block_size": hf["max_position_embeddings"],
            "vocab_size": hf["vocab_size"],
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "norm_eps": hf.get("rms_norm_eps", 1e-6),
        }

    def positional_from_hf_config(self, hf: dict[str, Any]) -> dict[str, Any]:
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "linear"):
            raise SpecError(
                f"config.json: rope type {kind!r} is not supported; "
                "aic's rope does plain and linear-scaled rotary embeddings."
            )
        section: dict[str, Any] = {"type": "rope", "theta": float(theta)}
        if kind == "linear":
            section["scaling_factor"] = float(rope["factor"])
        return section

    def state_dict_from_hf(
        self, hf_state: dict[str, torch.Tensor], config: TransformerConfig
    ) -> dict[str, torch.Tensor]:
        """Map LlamaForCausalLM tensors to aic names: q, k, v concatenate into qkv; gate and up into fc."""
        src = {k: v for k, v in hf_state.items() if not k.endswith("rotary_emb.inv_freq")}
        out: dict[str, torch.Tensor] = {}
        missing: list[str] = []
        for hf_names, name in _hf_names(config):
            absent = [n for n in hf_names if n not in src]
            if absent:
                missing += absent
            else:
                out[name] = torch.cat([src[n] for n in hf_names])
        if not config.tie_embeddings:
            if "lm_head.weight" in src:
                out["lm_head.weight"] = src["lm_head.weight"]
            else:
                missing.append("lm_head.weight")
        used = {n for hf_names, _ in _hf_names(config) for n in hf_names} | {"lm_head.weight"}
        extra = sorted(set(src) - used)
        if missing or extra:
            raise PluginError(
                f"the Llama checkpoint does not match its config.json ({config.n_layer} layers): missing tensors: "
                f"{', '.join(missing[:10]) or 'none'}; unexpected tensors: {', '.join(extra[:10]) or 'none'}. "
                "It is damaged, or config.json belongs to another model."
            )
        return pad_vocab(out, config.padded_vocab_size)

    def hf_config(self, options: Any, config: TransformerConfig) -> dict[str, Any]:
        positional = options.positional
        if positional.type != "rope":
            raise PluginError(
                f"LlamaForCausalLM has rotary positions only; this model uses '{positional.type}' positions, "
                "which the export would lose. Export llama + rope models, or keep this one in aic's format."
            )
        if positional.rotary_fraction != 1.0:
            raise PluginError(
                "LlamaForCausalLM rotates every dim of a head; this model rotates only a fraction of them "
                f"(model.positional.rotary_fraction {positional.rotary_fraction}), which the export would lose. "
                "Keep it in aic's format."
            )
        hf: dict[str, Any] = {
            "architectures": list(self.hf_architectures),
            "model_type": "llama",
            "vocab_size": config.vocab_size,
            "hidden_size": config.n_embd,
            "intermediate_size": config.hidden,
            "num_hidden_layers": config.n_layer,
            "num_attention_heads": config.n_head,
            "num_key_value_heads": config.kv_heads,
            "head_dim": config.head_dim,
            "max_position_embeddings": config.block_size,
            "hidden_act": "silu",
            "rms_norm_eps": config.norm_eps,
            "attention_bias": False,
            "mlp_bias": False,
            "attention_dropout": 0.0,
            "tie_word_embeddings": config.tie_embeddings,
            # The form both transformers 4.x and 5.x read (5.x turns it into rope_parameters).
            "rope_theta": positional.theta,
            "dtype": "float32",
        }
        if positional.scaling_factor != 1.0:
            hf["rope_scaling"] = {"type": "linear", "rope_type": "linear", "factor": positional.scaling_factor}
        return hf

    def state_dict_to_hf(self, state: dict[str, torch.Tensor], config: TransformerConfig) -> dict[str, torch.Tensor]:
        q, kv = config.n_head * config.head_dim, config.kv_heads * config.head_dim
        out = {}
        for hf_names, name in _hf_names(config):
            t = state[name]
            if name == "wte.weight":
                t = t[: config.vocab_size]
            sizes = {1: [t.shape[0]], 2: [t.shape[0] // 2] * 2, 3: [q, kv, kv]}[len(hf_names)]
            for hf_name, part in zip(hf_names, torch.split(t, sizes)):
                out[hf_name] = part.contiguous()
        if not config.tie_embeddings:
            out["lm_head.weight"] = state["lm_head.weight"][: config.vocab_size].contiguous()
        return out

    def hf_linear_map(self, config: TransformerConfig) -> dict[str, list[tuple[str, int, int]]]:
        q, kv = config.n_head * config.head_dim, config.kv_heads * config.head_dim
        sizes = {
            "attn.qkv": [q, kv, kv],
            "attn.proj": [config.n_embd],
            "mlp.fc": [config.hidden, config.hidden],
            "mlp.proj": [config.n_embd],
        }
        out: dict[str, list[tuple[str, int, int]]] = {}
        for hf_names, name in _hf_names(config):
            layer = name.removesuffix(".weight")
            kind = ".".join(layer.split(".")[2:])
            if kind in sizes:
                bounds = [0]
                for size in sizes[kind]:
                    bounds.append(bounds[-1] + size)
                out[layer] = [(n.removesuffix(".weight"), bounds[i], bounds[i + 1]) for i, n in enumerate(hf_names)]
        if not config.tie_embeddings:
            out["lm_head"] = [("lm_head", 0, config.vocab_size)]
        return out


def _hf_names(config: TransformerConfig) -> list[tuple[list[str], str]]:
    """(HF names concatenated in order, aic name) for every Llama tensor but the untied head."""
    names = [(["model.embed_tokens.weight"], "wte.weight")]
    for i in range(config.n_layer):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        names += [
            ([h + "input_layernorm.weight"], b + "norm1.weight"),
            ([h + f"self_attn.{p}_proj.weight" for p in "qkv"], b + "attn.qkv.weight"),
            ([h + "self_attn.o_proj.weight"], b + "attn.proj.weight"),
            ([h + "post_attention_layernorm.weight"], b + "norm2.weight"),
            ([h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"], b + "mlp.fc.weight"),
            ([h + "mlp.down_proj.weight"], b + "mlp.proj.weight"),
        ]
    return names + [(["model.norm.weight"], "norm_f.weight")]


@hookimpl
def aic_register_models(register):
    register(Llama)
