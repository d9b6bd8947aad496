"""Expert-parallel MoE stack: the math every rank runs, and the single-process dense reference it must equal.

Model (deterministic from ``ModelSpec``): L MoE layers of E SwiGLU experts; expert (l, e) has weights
``w1_FD, w3_FD`` (up, gate) and ``w2_DF`` (down) drawn from a generator seeded by (seed, l, e), so every
replica of an expert gets identical weights wherever it lives. Hidden states start as ``initial_hidden``; a
layer computes, per token, ``y = sum_k gate_k * expert_{e_k}(x)`` over the recorded ids (a repeated id
counts twice, in both the runtime and the reference), then ``x <- tanh(x + y)`` so layers chain.

The routing is replayed from a trace (every rank holds the trace: it plays the router); gate weights are the
trace's, or uniform 1/K when it has none.

Per rank and layer (``ep_layer``): choose replicas and rows (placement/runtime/dispatch.py), exchange counts, then
meta, gates and hidden rows with ``all_to_all_single``; compute with grouped per-expert matmuls over the local
slots only; send each partial sum to the token's combine rank; sum there, apply the per-token op. Payload rows
crossing ranks are counted per (layer, phase, destination); meta and count bytes separately.

Dimension key: T tokens, L MoE layers, K top-k, E experts, G ranks, S local slots per rank, D hidden, F ffn,
N rows sent (one per token and destination rank), M rows received, Q combine rows received.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from placement.plan import Plan
from placement.runtime.dispatch import (
    META_FIXED,
    EPError,
    Exchanger,
    ReplicaTable,
    build_dispatch,
    choose_ranks,
    combine_ranks,
    sent_off_rank,
)

PHASES = ("dispatch", "compute", "combine")

ExpertW = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # w1_FD, w3_FD, w2_DF


@dataclass(frozen=True)
class ModelSpec:
    """Shape and seed of the synthetic expert weights and input hidden states (float32)."""

    hidden: int = 256
    ffn: int = 128
    seed: int = 0

    def validate(self) -> None:
        if self.hidden < 1 or self.ffn < 1:
            raise EPError(f"hidden={self.hidden}, ffn={self.ffn}: both must be >= 1")


def _generator(*key: int) -> torch.Generator:
    state = np.random.SeedSequence([abs(int(k)) for k in key]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def expert_weights(spec: ModelSpec, layer: int, expert: int) -> ExpertW:
    """(w1_FD, w3_FD, w2_DF) of logical expert ``expert`` at MoE layer index ``layer`` (0-based)."""
    g = _generator(spec.seed, 1, layer, expert)
    D, Fd = spec.hidden, spec.ffn
    w1_FD = torch.randn(Fd, D, generator=g) / D**0.5
    w3_FD = torch.randn(Fd, D, generator=g) / D**0.5
    w2_DF = torch.randn(D, Fd, generator=g) / Fd**0.5
    return w1_FD, w3_FD, w2_DF


def stacked_weights(
    spec: ModelSpec,
    layer: int,
    experts: Sequence[int],
    device: torch.device,
    cache: dict[tuple[int, int], ExpertW] | None = None,
) -> ExpertW:
    """(w1_SFD, w3_SFD, w2_SDF) of ``experts`` (one entry per slot; replicas repeat an expert)."""
    ws = []
    for e in experts:
        key = (layer, int(e))
        if cache is None or key not in cache:
            w = expert_weights(spec, layer, int(e))
            if cache is None:
                ws.append(w)
                continue
            cache[key] = w
        ws.append(cache[key])
    w1_SFD, w3_SFD, w2_SDF = (torch.stack([w[i] for w in ws]).to(device) for i in range(3))
    return w1_SFD, w3_SFD, w2_SDF


def initial_hidden(spec: ModelSpec, num_tokens: int) -> torch.Tensor:
    """float32 [T, D]: hidden states entering the first MoE layer."""
    return torch.randn(num_tokens, spec.hidden, generator=_generator(spec.seed, 0))


def gates_or_uniform(ids_TLK: np.ndarray, gates_TLK: np.ndarray | None) -> np.ndarray:
    """float32 [T, L, K]: the trace's gate weights, or 1/K for every id when it has none."""
    if gates_TLK is not None:
        return np.asarray(gates_TLK, dtype=np.float32)
    return np.full(ids_TLK.shape, 1.0 / ids_TLK.shape[2], dtype=np.float32)


def grouped_ffn(x_ND: torch.Tensor, slot_NK: torch.Tensor, gate_NK: torch.Tensor, w: ExpertW) -> torch.Tensor:
    """float32 [N, D]: sum over k of gate_NK * expert(slot_NK)(x_ND) (slot -1: skipped).

    Work items (row, k) are sorted by slot and each slot with work runs one SwiGLU on its rows.
    """
    w1_SFD, w3_SFD, w2_SDF = w
    n_W, k_W = torch.nonzero(slot_NK >= 0, as_tuple=True)
    s_W = slot_NK[n_W, k_W]
    order_W = torch.argsort(s_W, stable=True)
    n_W, k_W, s_W = n_W[order_W], k_W[order_W], s_W[order_W]
    counts_S = torch.bincount(s_W, minlength=w1_SFD.shape[0]).tolist()
    y_ND = torch.zeros_like(x_ND)
    start = 0
    for s, c in enumerate(counts_S):
        if c == 0:
            continue
        rows = n_W[start : start + c]
        h_CD = x_ND[rows]
        a_CF = F.silu(h_CD @ w1_SFD[s].T) * (h_CD @ w3_SFD[s].T)
        y_ND.index_add_(0, rows, (a_CF @ w2_SDF[s].T) * gate_NK[rows, k_W[start : start + c]][:, None])
        start += c
    return y_ND


def between_layers(x_TD: torch.Tensor, y_TD: torch.Tensor) -> torch.Tensor:
    """The per-token op that chains layers: residual add, then tanh."""
    return torch.tanh(x_TD + y_TD)


def dense_reference(spec: ModelSpec, ids_TLK: np.ndarray, gates_TLK: np.ndarray | None) -> torch.Tensor:
    """float32 [T, D]: the whole stack in one process, every expert local (slot = logical id)."""
    T, L, _ = ids_TLK.shape
    gates = torch.from_numpy(gates_or_uniform(ids_TLK, gates_TLK))
    ids = torch.from_numpy(ids_TLK.astype(np.int64))
    E = int(ids_TLK.max()) + 1 if ids_TLK.size else 1
    x_TD = initial_hidden(spec, T)
    for layer in range(L):
        w = stacked_weights(spec, layer, range(E), torch.device("cpu"))
        x_TD = between_layers(x_TD, grouped_ffn(x_TD, ids[:, layer], gates[:, layer], w))
    return x_TD


# ------------------------------------------------------------------------------------------------ per rank


@dataclass(frozen=True)
class EPJob:
    """One replay: a plan, a communication model and the routing it replays (ids int [T, L, K])."""

    name: str
    plan: Plan
    mode: str
    ids_TLK: np.ndarray
    gates_TLK: np.ndarray | None = None


@dataclass(frozen=True)
class EPTask:
    """What every rank runs: the jobs in order on one process group, each ``repeats`` times."""

    model: ModelSpec
    jobs: tuple[EPJob, ...]
    repeats: int = 1


@dataclass(frozen=True)
class RankResult:
    """One rank's view of one job (counters from the last repeat; they are identical across repeats).

    tok_T int64 [T_r]: global ids of the tokens this rank holds at the end; x_TD float32 [T_r, D]: states.
    sent_rows_L2G / recv_rows_L2G int64 [L, 2, G]: payload rows to / from each other rank, per layer and phase
    (0 dispatch, 1 combine); sent_bytes_L2G: their bytes; meta_bytes: bytes of counts, ids and gates sent;
    seconds_RL3 float64 [repeats, L, 3]: wall time of dispatch, compute, combine.
    """

    rank: int
    tok_T: np.ndarray
    x_TD: np.ndarray
    sent_rows_L2G: np.ndarray
    recv_rows_L2G: np.ndarray
    sent_bytes_L2G: np.ndarray
    meta_bytes: int
    seconds_RL3: np.ndarray


@dataclass(frozen=True)
class LocalExperts:
    """The experts of one rank's slots: slot_expert_LS int64 [L, S], slot_of_LE int64 [L, E] (first local slot
    holding e, -1 if none), and per layer the stacked weights of the S slots."""

    slot_expert_LS: np.ndarray
    slot_of_LE: np.ndarray
    weights_L: tuple[ExpertW, ...]

    @classmethod
    def build(
        cls,
        plan: Plan,
        rank: int,
        spec: ModelSpec,
        device: torch.device,
        cache: dict[tuple[int, int], ExpertW] | None = None,
    ) -> LocalExperts:
        slot_expert_LS, slot_of_LE = slot_maps(plan, rank)
        L = slot_expert_LS.shape[0]
        weights = tuple(stacked_weights(spec, l, slot_expert_LS[l].tolist(), device, cache) for l in range(L))
        return cls(slot_expert_LS, slot_of_LE, weights)

    def local_slots(self, layer: int, expert_MK: np.ndarray, rank: int) -> np.ndarray:
        """int64 [M, K]: local slot of each expert id (-1 stays -1); raises if this rank holds none."""
        slot_MK = np.where(expert_MK >= 0, self.slot_of_LE[layer, np.maximum(expert_MK, 0)], -1)
        missing = (expert_MK >= 0) & (slot_MK < 0)
        if missing.any():
            e = int(expert_MK[missing][0])
            raise EPError(f"rank {rank} was sent expert {e} of layer {layer}, which it does not hold")
        return slot_MK


@dataclass(frozen=True)
class LayerStats:
    """Counters and timings of one rank at one layer."""

    sent_rows_2G: np.ndarray
    recv_rows_2G: np.ndarray
    sent_bytes_2G: np.ndarray
    meta_bytes: int
    seconds_3: np.ndarray


def _nbytes_per_row(t: torch.Tensor) -> int:
    return int(np.prod(t.shape[1:])) * t.element_size()


def slot_maps(plan: Plan, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(slot_expert_LS: expert of each of ``rank``'s S slots, slot_of_LE: its first local slot of expert e or -1)."""
    S = plan.slots_per_gpu
    slot_expert_LS = plan.phy2log[:, rank * S : (rank + 1) * S]
    L = slot_expert_LS.shape[0]
    slot_of_LE = np.full((L, plan.num_experts), -1, dtype=np.int64)
    for s in range(S - 1, -1, -1):  # lowest slot wins
        slot_of_LE[np.arange(L), slot_expert_LS[:, s]] = s
    return slot_expert_LS, slot_of_LE


def moe_exchange(
    ex: Exchanger,
    local: LocalExperts,
    table: ReplicaTable,
    layer: int,
    mode: str,
    tok_T: np.ndarray,
    x_TD: torch.Tensor,
    ids_TK: np.ndarray,
    gates_TK: np.ndarray,
) -> tuple[np.ndarray, torch.Tensor, torch.Tensor, LayerStats]:
    """One MoE layer's experts on one rank: held tokens (sorted ids, states, routing) in -> (tokens held after
    the combine, sorted; their input states; their summed expert outputs; stats) out."""
    r, G, dev = ex.rank, ex.world, ex.device
    t0 = time.perf_counter()
    # Dispatch: a row per (token, destination rank), with meta (token, combine rank, expert ids) and gates.
    ids_TK = ids_TK.astype(np.int64)
    at_T = np.full(tok_T.size, r, dtype=np.int64)
    rank_TK = choose_ranks(table, layer, tok_T, at_T, ids_TK)
    combine_T = combine_ranks(rank_TK, at_T, mode)
    d = build_dispatch(tok_T, ids_TK, gates_TK, rank_TK, combine_T, G)
    recv_G = ex.counts(d.send_counts_G)
    meta_t = torch.from_numpy(d.meta_NM).to(dev)
    gate_t = torch.from_numpy(d.gate_NK).to(dev)
    xsend_ND = x_TD[torch.from_numpy(d.row_T_N).to(dev)]
    meta_MM = ex.rows(meta_t, d.send_counts_G, recv_G).cpu().numpy()
    gate_MK = ex.rows(gate_t, d.send_counts_G, recv_G)
    xin_MD = ex.rows(xsend_ND, d.send_counts_G, recv_G)
    t1 = time.perf_counter()
    # Compute: grouped matmuls over this rank's slots.
    slot_MK = local.local_slots(layer, meta_MM[:, META_FIXED:], r)
    part_MD = grouped_ffn(xin_MD, torch.from_numpy(slot_MK).to(dev), gate_MK, local.weights_L[layer])
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t2 = time.perf_counter()
    # Combine: each partial sum goes to its token's combine rank.
    home_M = meta_MM[:, 1]
    order_M = np.argsort(home_M, kind="stable")
    send2_G = np.bincount(home_M, minlength=G).astype(np.int64)
    recv2_G = ex.counts(send2_G)
    tok_send = torch.from_numpy(np.ascontiguousarray(meta_MM[order_M, 0])).to(dev)
    tok_Q = ex.rows(tok_send, send2_G, recv2_G).cpu().numpy()
    part_QD = ex.rows(part_MD[torch.from_numpy(order_M).to(dev)], send2_G, recv2_G)
    # Tokens held from now on: own tokens combined here, plus tokens that moved here (follow mode).
    src_M = np.repeat(np.arange(G), recv_G)
    arrive_M = (home_M == r) & (src_M != r)
    keep_T = combine_T == r
    new_tok = np.concatenate([tok_T[keep_T], meta_MM[arrive_M, 0]])
    new_x = torch.cat([x_TD[torch.from_numpy(keep_T).to(dev)], xin_MD[torch.from_numpy(arrive_M).to(dev)]])
    order = np.argsort(new_tok, kind="stable")
    new_tok, new_x = new_tok[order], new_x[torch.from_numpy(order).to(dev)]
    pos_Q = np.searchsorted(new_tok, tok_Q)
    if tok_Q.size and (pos_Q.max() >= new_tok.size or (new_tok[pos_Q] != tok_Q).any()):
        raise EPError(f"rank {r} got a combine row for a token it does not hold at layer {layer}")
    y_TD = torch.zeros_like(new_x).index_add_(0, torch.from_numpy(pos_Q).to(dev), part_QD)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t3 = time.perf_counter()
    sent_2G = np.stack([sent_off_rank(d.send_counts_G, r), sent_off_rank(send2_G, r)])
    recv_2G = np.stack([sent_off_rank(recv_G, r), sent_off_rank(recv2_G, r)])
    sent_bytes_2G = np.stack([sent_2G[0] * _nbytes_per_row(xsend_ND), sent_2G[1] * _nbytes_per_row(part_MD)])
    meta_row = _nbytes_per_row(meta_t) + _nbytes_per_row(gate_t)
    meta_bytes = int(sent_2G[0].sum()) * meta_row + int(sent_2G[1].sum()) * _nbytes_per_row(tok_send)
    meta_bytes += 2 * (G - 1) * 8  # the two count exchanges
    stats = LayerStats(sent_2G, recv_2G, sent_bytes_2G, meta_bytes, np.array([t1 - t0, t2 - t1, t3 - t2]))
    return new_tok, new_x, y_TD, stats


def ep_layer(
    ex: Exchanger,
    local: LocalExperts,
    table: ReplicaTable,
    layer: int,
    mode: str,
    tok_T: np.ndarray,
    x_TD: torch.Tensor,
    ids_TLK: np.ndarray,
    gates_TLK: np.ndarray,
) -> tuple[np.ndarray, torch.Tensor, LayerStats]:
    """One MoE layer of the replayed stack on one rank: (token ids, states) in -> (token ids, states) out,
    sorted by token id; the next layer's input is ``between_layers(x, y)``."""
    new_tok, new_x, y_TD, stats = moe_exchange(
        ex, local, table, layer, mode, tok_T, x_TD, ids_TLK[tok_T, layer], gates_TLK[tok_T, layer]
    )
    return new_tok, between_layers(new_x, y_TD), stats


def forward_stack(
    ex: Exchanger, job: EPJob, local: LocalExperts, table: ReplicaTable, gates_TLK: np.ndarray, x0_TD: torch.Tensor
) -> tuple[np.ndarray, torch.Tensor, list[LayerStats]]:
    """The whole stack once: token t starts on rank t mod G; returns the tokens held at the end."""
    tok_T = np.arange(ex.rank, job.ids_TLK.shape[0], ex.world, dtype=np.int64)
    x_TD = x0_TD[torch.from_numpy(tok_T)].to(ex.device)
    stats = []
    ex.barrier()
    for layer in range(job.ids_TLK.shape[1]):
        tok_T, x_TD, st = ep_layer(ex, local, table, layer, job.mode, tok_T, x_TD, job.ids_TLK, gates_TLK)
        stats.append(st)
    return tok_T, x_TD, stats


def run_rank(ex: Exchanger, task: EPTask) -> list[RankResult]:
    """Every job of ``task`` on this rank (a plain function: torch.multiprocessing or Ray actors call it).

    Repeats are interleaved (job 1, job 2, ..., job 1, ...) so slow drift of a shared machine hits every job
    alike; jobs sharing a plan object share its local experts.
    """
    locals_: dict[int, tuple[LocalExperts, ReplicaTable]] = {}
    for job in task.jobs:
        if id(job.plan) not in locals_:
            cache: dict[tuple[int, int], ExpertW] = {}  # replicas share one generation
            local = LocalExperts.build(job.plan, ex.rank, task.model, ex.device, cache)
            locals_[id(job.plan)] = (local, ReplicaTable.from_plan(job.plan))
    gates = [gates_or_uniform(job.ids_TLK, job.gates_TLK) for job in task.jobs]
    x0 = [initial_hidden(task.model, job.ids_TLK.shape[0]) for job in task.jobs]
    seconds_JRL3 = [np.zeros((task.repeats, job.ids_TLK.shape[1], len(PHASES))) for job in task.jobs]
    last: list[tuple[np.ndarray, torch.Tensor, list[LayerStats]]] = []
    for rep in range(task.repeats):
        last = []
        for j, job in enumerate(task.jobs):
            local, table = locals_[id(job.plan)]
            tok_T, x_TD, stats = forward_stack(ex, job, local, table, gates[j], x0[j])
            seconds_JRL3[j][rep] = np.stack([s.seconds_3 for s in stats])
            last.append((tok_T, x_TD, stats))
    return [rank_result(ex.rank, tok_T, x_TD, stats, seconds_JRL3[j]) for j, (tok_T, x_TD, stats) in enumerate(last)]


def rank_result(
    rank: int, tok_T: np.ndarray, x_TD: torch.Tensor, stats: Sequence[LayerStats], seconds_RL3: np.ndarray
) -> RankResult:
    """One job's ``RankResult`` from what ``forward_stack`` returned (and the repeats' timings)."""
    return RankResult(
        rank=rank,
        tok_T=tok_T,
        x_TD=x_TD.cpu().numpy(),
        sent_rows_L2G=np.stack([s.sent_rows_2G for s in stats]),
        recv_rows_L2G=np.stack([s.recv_rows_2G for s in stats]),
        sent_bytes_L2G=np.stack([s.sent_bytes_2G for s in stats]),
        meta_bytes=sum(s.meta_bytes for s in stats),
        seconds_RL3=seconds_RL3,
    )
