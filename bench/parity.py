"""Logit parity of aic's models against transformers, on random weights, in float32.

Builds GPT2LMHeadModel and LlamaForCausalLM from small random configs, saves each with
save_pretrained, imports the folder through aic_core.model.loading.import_hf, and prints the max abs
difference of the logits on fixed token ids, and of aic's KV-cache decoding against a full forward.

    python bench/parity.py
"""

from __future__ import annotations

import tempfile

import torch
import transformers

from aic_core.model.loading import import_hf

GPT2 = dict(n_layer=3, n_head=4, n_embd=64, n_positions=128, vocab_size=1000, bos_token_id=0, eos_token_id=0)
LLAMA = dict(
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=8,
    max_position_embeddings=128,
    vocab_size=1000,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)
CASES = {
    "gpt2, tied": (transformers.GPT2Config, transformers.GPT2LMHeadModel, GPT2),
    "gpt2, untied": (transformers.GPT2Config, transformers.GPT2LMHeadModel, {**GPT2, "tie_word_embeddings": False}),
    "llama, GQA 8/2": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {**LLAMA, "num_key_value_heads": 2}),
    "llama, MHA 8/8": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {**LLAMA, "num_key_value_heads": 8}),
    "llama, MQA 8/1, tied": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        {**LLAMA, "num_key_value_heads": 1, "tie_word_embeddings": True},
    ),
    "llama, rope linear x2": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        {
            **LLAMA,
            "num_key_value_heads": 2,
            "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0},
        },
    ),
}


def main() -> None:
    idx = torch.randint(0, 1000, (2, 50), generator=torch.Generator().manual_seed(3))
    print("| model | vs transformers (max abs) | KV cache vs full forward (max abs) |")
    print("|---|---:|---:|")
    for name, (config_cls, model_cls, fields) in CASES.items():
        torch.manual_seed(0)
        hf = model_cls(config_cls(**fields)).eval()
        with tempfile.TemporaryDirectory() as folder:
            hf.save_pretrained(folder, safe_serialization=True)
            model = import_hf(folder).model
        with torch.no_grad():
            full = model(idx)
            diff_hf = (full - hf(idx).logits).abs().max().item()
            cache = model.new_cache(2, idx.shape[1])
            stepped = torch.cat(
                [model(idx[:, :40], cache=cache)] + [model(idx[:, t : t + 1], cache=cache) for t in range(40, 50)],
                dim=1,
            )
            diff_cache = (stepped - full).abs().max().item()
        print(f"| {name} | {diff_hf:.1e} | {diff_cache:.1e} |")


if __name__ == "__main__":
    main()
