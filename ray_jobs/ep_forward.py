"""Expert-parallel forward of the shipped demo MoE (plain torch; a Ray actor or any process runs it per rank).

Every rank holds the dense part of the model (embeddings, attention, routers, dense FFNs) and the experts
``[rank * E/G, (rank + 1) * E/G)`` of every MoE layer. Ranks run their own prompt batches (attention is
data-parallel); at each MoE layer the local router decides, one row per (token, k) goes to the rank owning
the chosen expert over ``all_to_all_single`` (``placement.runtime.dispatch.DistExchanger``), that rank applies the
expert and the gate, and the rows come back to be summed per token. Routing is recorded on the rank that
owns the token, by the same hooks as the single-process profiler.

All ranks must run the same number of forwards (each MoE layer is a collective): a rank without a batch in a
step runs a one-token dummy forward that is not recorded.

Dimension key: B batch, S sequence, T tokens (B * S), K top-k, E experts, G ranks, El = E / G local experts,
D model width, F expert width, N rows sent (T * K), M rows received.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from placement.runtime.dispatch import Exchanger
from placement.trace.dataset import TraceWriter
from profiler.api import LoadedModel, ProfileError, profile_prompts
from profiler.model import DemoMoE, GroupedExperts, MoEFeedForward

__all__ = ["EPMoEFeedForward", "ep_profile_prompts", "shard_experts"]


class EPMoEFeedForward(MoEFeedForward):
    """A ``MoEFeedForward`` whose experts live on the ranks of an exchanger (this rank keeps El of them)."""

    def __init__(self, base: MoEFeedForward, ex: Exchanger) -> None:
        nn.Module.__init__(self)
        E = base.n_experts
        if E % ex.world:
            raise ProfileError(f"{E} experts do not split evenly over {ex.world} expert-parallel workers")
        El = E // ex.world
        lo = ex.rank * El
        self.router = base.router
        self.n_experts = E
        self.ex = ex
        self.first_expert = lo
        src = base.experts
        self.experts = GroupedExperts.__new__(GroupedExperts)
        nn.Module.__init__(self.experts)
        self.experts.w_gate_EDF = nn.Parameter(src.w_gate_EDF.data[lo : lo + El].clone())
        self.experts.w_up_EDF = nn.Parameter(src.w_up_EDF.data[lo : lo + El].clone())
        self.experts.w_down_EFD = nn.Parameter(src.w_down_EFD.data[lo : lo + El].clone())

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ex = self.ex
        G = ex.world
        El = self.experts.w_gate_EDF.shape[0]
        topk_ids_TK, topk_weights_TK = self.router(x_TD)
        K = topk_ids_TK.shape[1]
        # Dispatch: one row per (token, k), grouped by the rank owning the expert.
        flat_ids_N = topk_ids_TK.reshape(-1)
        order_N = torch.argsort(flat_ids_N, stable=True)  # by expert, hence by owner rank
        token_N = order_N // K
        send_G = torch.bincount(flat_ids_N // El, minlength=G).numpy()
        recv_G = ex.counts(send_G)
        x_MD = ex.rows(x_TD[token_N], send_G, recv_G)
        local_M = ex.rows(flat_ids_N[order_N] % El, send_G, recv_G)
        gate_M = ex.rows(topk_weights_TK.reshape(-1)[order_N].to(x_TD.dtype), send_G, recv_G)
        # Compute: each local expert on its rows (as GroupedExperts does), scaled by the gate.
        y_MD = _local_experts(self.experts, x_MD, local_M) * gate_M[:, None]
        # Combine: rows return to their senders in the order sent; sum per token.
        back_ND = ex.rows(y_MD, recv_G, send_G)
        y_TD = torch.zeros_like(x_TD).index_add_(0, token_N, back_ND)
        return y_TD, x_TD.new_zeros(())


def _local_experts(experts: GroupedExperts, x_MD: torch.Tensor, local_M: torch.Tensor) -> torch.Tensor:
    """float [M, D]: SwiGLU of local expert ``local_M[m]`` on row m."""
    El = experts.w_gate_EDF.shape[0]
    order = torch.argsort(local_M, stable=True)
    counts = torch.bincount(local_M, minlength=El).tolist()
    out_MD = torch.empty_like(x_MD)
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        rows = order[start : start + c]
        chunk = x_MD[rows]
        h = F.silu(chunk @ experts.w_gate_EDF[e]) * (chunk @ experts.w_up_EDF[e])
        out_MD[rows] = h @ experts.w_down_EFD[e]
        start += c
    return out_MD


def shard_experts(model: LoadedModel, ex: Exchanger) -> LoadedModel:
    """Replace every MoE FFN of the demo model in place by its expert-parallel version on this rank."""
    module = model.module
    if not isinstance(module, DemoMoE):
        raise ProfileError(f"expert-parallel mode supports the builtin demo model only, not {model.name}")
    for block in module.blocks:
        if isinstance(block.ffn, MoEFeedForward) and not isinstance(block.ffn, EPMoEFeedForward):
            block.ffn = EPMoEFeedForward(block.ffn, ex)
    return model


def ep_profile_prompts(
    model: LoadedModel,
    ex: Exchanger,
    prompts: Sequence[str],
    prompt_ids: Sequence[int],
    writer: TraceWriter,
    *,
    batch_size: int,
    max_len: int,
) -> int:
    """Trace this rank's share of a shard (collective: every rank calls it with the same shard).

    Batches of ``batch_size`` consecutive prompts go round-robin to the ranks (batch b to rank b mod G), so
    every forward holds the same prompts as in a single-process profile. Returns tokens traced here.
    """
    G, r = ex.world, ex.rank
    batches = [range(a, min(a + batch_size, len(prompts))) for a in range(0, len(prompts), batch_size)]
    steps = -(-len(batches) // G)
    total = 0
    for step in range(steps):
        b = step * G + r
        mine = [i for i in batches[b] if model.tokenizer(prompts[i])[:1]] if b < len(batches) else []
        if mine:
            total += profile_prompts(
                model,
                [prompts[i] for i in mine],
                [prompt_ids[i] for i in mine],
                writer,
                batch_size=len(mine),
                max_len=max_len,
            )
        else:  # keep the collectives in step
            with torch.inference_mode():
                model.forward(
                    model.module.eval(), torch.zeros((1, 1), dtype=torch.int64), torch.ones((1, 1), dtype=torch.int64)
                )
    return total
