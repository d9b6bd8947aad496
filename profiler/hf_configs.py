"""Tiny Hugging Face MoE presets for ``--model hf-config:<name>``: random weights, built offline.

Every preset has hidden size 64, 4 decoder layers, 8 routed experts, top-2 routing and a byte-level
vocabulary (256), so a model builds in milliseconds and runs on any CPU. Family quirks are kept on
purpose so that routing capture is exercised where it differs:

==================  ===========================================================================
preset              what it exercises
==================  ===========================================================================
mixtral-tiny        softmax top-k router, renormalised weights; every layer is MoE
qwen2-moe-tiny      softmax top-k without renormalisation; a gated shared expert (not recorded)
qwen3-moe-tiny      renormalised top-k; layer 0 dense (``mlp_only_layers``)
olmoe-tiny          softmax top-k without renormalisation; every layer is MoE
deepseek-v3-tiny    sigmoid scores + ``e_score_correction_bias`` (set to random values here) and
                    group-limited selection (4 groups, top-2 groups); layer 0 dense
                    (``first_k_dense_replace``); one shared expert (not recorded)
==================  ===========================================================================

Dimension key: E routed experts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["PRESETS", "build_tiny_config", "build_tiny_model"]

_COMMON: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "num_experts_per_tok": 2,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}

# preset name -> (transformers model_type, family-specific config fields)
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral-tiny": ("mixtral", {"num_local_experts": 8}),
    "qwen2-moe-tiny": (
        "qwen2_moe",
        {
            "num_experts": 8,
            "moe_intermediate_size": 64,
            "shared_expert_intermediate_size": 128,
            "norm_topk_prob": False,
        },
    ),
    "qwen3-moe-tiny": (
        "qwen3_moe",
        {
            "num_experts": 8,
            "moe_intermediate_size": 64,
            "norm_topk_prob": True,
            "head_dim": 16,
            "mlp_only_layers": [0],
        },
    ),
    "olmoe-tiny": ("olmoe", {"num_experts": 8, "norm_topk_prob": False}),
    "deepseek-v3-tiny": (
        "deepseek_v3",
        {
            "n_routed_experts": 8,
            "moe_intermediate_size": 64,
            "n_shared_experts": 1,
            "n_group": 4,
            "topk_group": 2,
            "first_k_dense_replace": 1,
            "kv_lora_rank": 16,
            "q_lora_rank": 32,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 16,
            "num_key_value_heads": 4,  # multi-head latent attention: one KV head per query head
        },
    ),
}

# Scale of the random e_score_correction_bias of deepseek-v3-tiny: large enough to change the choice of
# many tokens against the raw sigmoid scores (which a freshly initialised router keeps near 0.5).
_BIAS_SCALE = 0.05


class PresetError(ValueError):
    """Unknown preset name."""


def build_tiny_config(name: str) -> Any:
    """The ``transformers`` config of preset ``name`` (a ``PretrainedConfig``)."""
    from transformers import AutoConfig

    if name not in PRESETS:
        raise PresetError(f"unknown hf-config preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    model_type, fields = PRESETS[name]
    return AutoConfig.for_model(model_type, **{**_COMMON, **fields})


def build_tiny_model(name: str, seed: int = 0) -> nn.Module:
    """Preset ``name`` as an ``AutoModelForCausalLM`` with seeded random weights, in eval mode.

    The global torch RNG is left untouched. DeepSeek-V3 routers get a random correction bias so that
    the bias and the group limit actually decide routing.
    """
    from transformers import AutoModelForCausalLM

    config = build_tiny_config(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            for module in model.modules():
                bias_E = getattr(module, "e_score_correction_bias", None)
                if isinstance(bias_E, torch.Tensor):
                    bias_E.copy_(torch.randn_like(bias_E) * _BIAS_SCALE)
    return model.eval()
