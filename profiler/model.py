"""The project's own small decoder-only Mixture-of-Experts language model.

A byte-level model (vocabulary 256, no tokenizer download) shipped with trained weights in
``profiler/assets`` so that routing capture, profiling and placement can be exercised on any
machine, offline. Layout follows DeepSeek-style MoE models: the first ``n_dense_layers`` blocks use
a dense feed-forward network, the rest use top-k routed experts.

Dimension key:
    B  batch (sequences)
    S  sequence length (positions)
    T  tokens (B * S flattened)
    D  model width (d_model)
    H  attention heads
    E  routed experts per MoE layer
    K  experts chosen per token (top-k)
    F  expert feed-forward width
    V  vocabulary (256 bytes)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "VOCAB_SIZE",
    "ByteTokenizer",
    "DemoMoE",
    "MoEConfig",
    "ModelOutput",
    "Router",
    "load_demo_model",
    "save_demo_model",
]

VOCAB_SIZE = 256
CONFIG_SCHEMA_VERSION = 1


class ModelConfigError(ValueError):
    """A model configuration or checkpoint is invalid."""


@dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes are the tokens: id = byte value, vocabulary 256."""

    vocab_size: int = VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def __call__(self, text: str) -> list[int]:
        return self.encode(text)


@dataclass(frozen=True)
class MoEConfig:
    """Shape of a :class:`DemoMoE`. Layers ``0 .. n_dense_layers-1`` are dense, the rest are MoE."""

    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_experts: int = 16
    top_k: int = 2
    expert_ffn_dim: int = 128
    dense_ffn_dim: int = 256
    n_dense_layers: int = 1
    max_seq_len: int = 256
    vocab_size: int = VOCAB_SIZE

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads != 0:
            raise ModelConfigError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if not 1 <= self.top_k <= self.n_experts:
            raise ModelConfigError(f"top_k={self.top_k} must be in [1, n_experts={self.n_experts}]")
        if not 0 <= self.n_dense_layers < self.n_layers:
            raise ModelConfigError(
                f"n_dense_layers={self.n_dense_layers} must leave at least one MoE layer of {self.n_layers}"
            )
        for name in ("d_model", "n_layers", "n_heads", "n_experts", "expert_ffn_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ModelConfigError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Transformer block indices that hold routed experts."""
        return tuple(range(self.n_dense_layers, self.n_layers))

    def to_json(self) -> str:
        return json.dumps({"schema_version": CONFIG_SCHEMA_VERSION, **asdict(self)}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> MoEConfig:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ModelConfigError("model config JSON must be an object")
        version = raw.pop("schema_version", None)
        if version != CONFIG_SCHEMA_VERSION:
            raise ModelConfigError(f"model config schema_version={version!r}, expected {CONFIG_SCHEMA_VERSION}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ModelConfigError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**raw)


class ModelOutput(NamedTuple):
    logits_BSV: torch.Tensor
    aux_loss: torch.Tensor  # load-balancing loss summed over MoE layers (0 in eval mode)


class Router(nn.Module):
    """Linear gate → softmax over E experts → top-k, weights renormalised over the chosen k.

    ``forward`` returns exactly the decision the MoE block then uses, so a forward hook on this
    module reads the routing as executed: ``(topk_ids_TK int64, topk_weights_TK float)``.
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        self.top_k = top_k

    def probs(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Softmax router probabilities ``[T, E]`` (float32)."""
        return F.softmax(self.gate(x_TD).float(), dim=-1)

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs_TE = self.probs(x_TD)
        topk_weights_TK, topk_ids_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        topk_weights_TK = topk_weights_TK / topk_weights_TK.sum(dim=-1, keepdim=True)
        return topk_ids_TK, topk_weights_TK


class GroupedExperts(nn.Module):
    """E SwiGLU experts applied with one matmul group per expert (tokens sorted by expert)."""

    def __init__(self, n_experts: int, d_model: int, ffn_dim: int) -> None:
        super().__init__()
        scale_in = d_model**-0.5
        scale_out = ffn_dim**-0.5
        self.w_gate_EDF = nn.Parameter(torch.randn(n_experts, d_model, ffn_dim) * scale_in)
        self.w_up_EDF = nn.Parameter(torch.randn(n_experts, d_model, ffn_dim) * scale_in)
        self.w_down_EFD = nn.Parameter(torch.randn(n_experts, ffn_dim, d_model) * scale_out)

    def forward(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor) -> torch.Tensor:
        n_experts = self.w_gate_EDF.shape[0]
        top_k = topk_ids_TK.shape[1]
        flat_ids = topk_ids_TK.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)
        token_of_slot = order // top_k
        counts_E = torch.bincount(flat_ids, minlength=n_experts).tolist()
        x_sorted = x_TD[token_of_slot]
        outs = []
        for e, chunk in enumerate(torch.split(x_sorted, counts_E)):
            if chunk.shape[0] == 0:
                continue
            h = F.silu(chunk @ self.w_gate_EDF[e]) * (chunk @ self.w_up_EDF[e])
            outs.append(h @ self.w_down_EFD[e])
        y_sorted = torch.cat(outs) * topk_weights_TK.reshape(-1)[order, None].to(x_TD.dtype)
        return torch.zeros_like(x_TD).index_add_(0, token_of_slot, y_sorted)


class MoEFeedForward(nn.Module):
    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.router = Router(cfg.d_model, cfg.n_experts, cfg.top_k)
        self.experts = GroupedExperts(cfg.n_experts, cfg.d_model, cfg.expert_ffn_dim)
        self.n_experts = cfg.n_experts

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        topk_ids_TK, topk_weights_TK = self.router(x_TD)
        y_TD = self.experts(x_TD, topk_ids_TK, topk_weights_TK)
        if not self.training:
            return y_TD, x_TD.new_zeros(())
        # Switch-Transformer balance loss: E * sum_e (share of slots to e) * (mean router prob of e).
        probs_TE = self.router.probs(x_TD)
        slots_E = torch.bincount(topk_ids_TK.reshape(-1), minlength=self.n_experts).float()
        frac_E = slots_E / slots_E.sum()
        aux = self.n_experts * (frac_E * probs_TE.mean(dim=0)).sum()
        return y_TD, aux


class DenseFeedForward(nn.Module):
    def __init__(self, d_model: int, ffn_dim: int) -> None:
        super().__init__()
        self.w_gate = nn.Linear(d_model, ffn_dim, bias=False)
        self.w_up = nn.Linear(d_model, ffn_dim, bias=False)
        self.w_down = nn.Linear(ffn_dim, d_model, bias=False)

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.w_down(F.silu(self.w_gate(x_TD)) * self.w_up(x_TD)), x_TD.new_zeros(())


class Block(nn.Module):
    def __init__(self, cfg: MoEConfig, is_moe: bool) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.attn_norm = nn.RMSNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.attn_out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.ffn_norm = nn.RMSNorm(cfg.d_model)
        self.ffn: MoEFeedForward | DenseFeedForward = (
            MoEFeedForward(cfg) if is_moe else DenseFeedForward(cfg.d_model, cfg.dense_ffn_dim)
        )

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(self.attn_norm(x_BSD)).view(B, S, 3, self.n_heads, D // self.n_heads).unbind(2)
        # Causal attention only: sequences are right-padded, so real positions never see padding.
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x_BSD = x_BSD + self.attn_out(a.transpose(1, 2).reshape(B, S, D))
        y_TD, aux = self.ffn(self.ffn_norm(x_BSD).reshape(B * S, D))
        return x_BSD + y_TD.view(B, S, D), aux


class DemoMoE(nn.Module):
    """Decoder-only byte-level MoE LM. ``forward(input_ids_BS) -> ModelOutput``."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        moe = set(cfg.moe_layers)
        self.blocks = nn.ModuleList(Block(cfg, i in moe) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, input_ids_BS: torch.Tensor) -> ModelOutput:
        S = input_ids_BS.shape[1]
        if S > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds max_seq_len={self.cfg.max_seq_len}")
        positions_S = torch.arange(S, device=input_ids_BS.device)
        x_BSD = self.embed(input_ids_BS) + self.pos(positions_S)
        aux = x_BSD.new_zeros(())
        for block in self.blocks:
            x_BSD, block_aux = block(x_BSD)
            aux = aux + block_aux
        return ModelOutput(self.lm_head(self.norm(x_BSD)), aux)

    def routers(self) -> list[tuple[int, Router]]:
        """``(moe_layer_id, router)`` for each MoE block, layer id = transformer block index."""
        return [(i, block.ffn.router) for i, block in enumerate(self.blocks) if isinstance(block.ffn, MoEFeedForward)]


def save_demo_model(model: DemoMoE, weights_path: Path, config_path: Path, dtype: torch.dtype) -> None:
    """Write weights (safetensors, cast to ``dtype``) and the JSON config."""
    from safetensors.torch import save_file

    tensors = {name: t.detach().to(dtype).contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, str(weights_path))
    config_path.write_text(model.cfg.to_json() + "\n", encoding="utf-8")


def load_demo_model(weights_path: Path, config_path: Path) -> DemoMoE:
    """Load a :class:`DemoMoE` in float32 eval mode from safetensors weights + JSON config."""
    from safetensors.torch import load_file

    for p in (weights_path, config_path):
        if not p.is_file():
            raise ModelConfigError(f"model file not found: {p}")
    cfg = MoEConfig.from_json(config_path.read_text(encoding="utf-8"))
    model = DemoMoE(cfg)
    state = {k: v.float() for k, v in load_file(str(weights_path)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelConfigError(
            f"{weights_path}: weights do not fit config (missing={missing[:3]}, unexpected={unexpected[:3]})"
        )
    return model.eval()
