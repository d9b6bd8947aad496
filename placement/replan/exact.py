"""Exact re-planning under a move budget: a 0/1 model solved by CP-SAT or PuLP/CBC (placement/solvers/ilp_backends.py).

The problem (one replica per expert, GPU identity fixed by the current plan): put each expert of each layer on
one GPU, E/G per GPU, each GPU's load per layer within the cap, at most K experts away from their current GPU
(K moves, ../shared/METRICS.md), maximising co-located transition traffic (the numerator of colocation).

The model is a multi-commodity flow over the layer chain, one commodity per GPU: a GPU's contents at layer l is
a *block* (E/G experts within the cap), and its blocks at consecutive layers are joined by a flow variable that
earns the traffic between the two blocks. Its LP relaxation is much tighter than pairwise ``y <= x`` links (on
Mixtral's prefill, G = 8, the pairwise model left a 12% gap at K = 64 after 30 s; this one proves K <= 32 in
about 10 s), and the budget is one linear row.

Data: cur[l, e] current GPU; load[l, e] and trans[l, i, j] (float counts are scaled to integers for CP-SAT);
cap[l] the most load one GPU may take; K the move budget; w[x, b, c] traffic between blocks b (layer x) and c.
Variables: p[l, b, g] = 1 if GPU g holds block b at layer l; f[x, b, c, g] = 1 if GPU g holds b at layer x
and c at layer x + 1.
Constraints: each expert in one chosen block per layer; one block per GPU per layer; flow conservation
(sum over c of f[x, b, c, g] = p[x, b, g], sum over b of f[x, b, c, g] = p[x + 1, c, g]); moves <= K.
Objective: maximise sum of w[x, b, c] * f[x, b, c, g].

Dimension key: L layers, X layer pairs, E experts, G GPUs, B blocks, K experts per block, F block pairs,
V variables.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import numpy as np

from placement.solvers.ilp import ModelBuilder
from placement.solvers.ilp_backends import MipModel, solve


@dataclass(frozen=True)
class ExactResult:
    """gpu_LE int64 [L, E] or None; status optimal | feasible | infeasible | unknown; colocated traffic of the
    solution and an upper bound on it (input units); wall time."""

    gpu_LE: np.ndarray | None
    status: str
    objective: float | None
    bound: float | None
    seconds: float
    info: dict[str, object]


def _integer(a: np.ndarray, top: float = 1e6) -> tuple[np.ndarray, float]:
    """(a as integers, scale): counts that are already integers keep scale 1, others are scaled to ``top``."""
    a = np.asarray(a, dtype=np.float64)
    if np.allclose(a, np.round(a)) and a.max(initial=0.0) < 1e9:
        return np.round(a), 1.0
    scale = top / max(float(a.max(initial=0.0)), 1e-12)
    return np.round(a * scale), scale


def _blocks(num_experts: int, per_gpu: int) -> np.ndarray:
    return np.array(list(itertools.combinations(range(num_experts), per_gpu)), dtype=np.int64).reshape(-1, per_gpu)


def flow_num_vars(load_LE: np.ndarray, num_gpus: int, cap_L: np.ndarray) -> int:
    """Variables of the model (p and f), counting only blocks within the cap; huge when E/G is large."""
    E = load_LE.shape[1]
    if math.comb(E, E // num_gpus) > 5_000:
        return math.comb(E, E // num_gpus) ** 2 * num_gpus
    blocks_BK = _blocks(E, E // num_gpus)
    nok_L = (np.asarray(load_LE)[:, blocks_BK].sum(axis=2) <= np.asarray(cap_L)[:, None] + 1e-9).sum(axis=1)
    return int(num_gpus * (nok_L.sum() + (nok_L[:-1] * nok_L[1:]).sum()))


def build_model(
    cur_LE: np.ndarray,
    load_LE: np.ndarray,
    trans_XEE: np.ndarray,
    num_gpus: int,
    cap_L: np.ndarray,
    max_moves: int,
    hint_LE: np.ndarray | None = None,
) -> MipModel:
    """The bounded-move model (module docstring); the hint must meet the budget (caps widen to fit it)."""
    L, E = cur_LE.shape
    G, k = num_gpus, E // num_gpus
    blocks_BK = _blocks(E, k)
    B = blocks_BK.shape[0]
    member_BE = np.zeros((B, E))
    member_BE[np.repeat(np.arange(B), k), blocks_BK.reshape(-1)] = 1.0
    trans_int, _ = _integer(trans_XEE)
    w_XBC = np.einsum("be,xef,cf->xbc", member_BE, trans_int, member_BE)
    cap = np.asarray(cap_L, dtype=np.float64) * (1 + 1e-9)
    block_load_LB = np.asarray(load_LE, dtype=np.float64)[:, blocks_BK].sum(axis=2)
    ok_LB = block_load_LB <= cap[:, None]
    hint_LG = None
    if hint_LE is not None:  # the hint's blocks stay allowed
        index = {tuple(b): i for i, b in enumerate(blocks_BK.tolist())}
        hint_LG = np.array(
            [[index[tuple(np.flatnonzero(hint_LE[l] == g).tolist())] for g in range(G)] for l in range(L)]
        )
        ok_LB[np.arange(L)[:, None], hint_LG] = True
    # moves of block b on GPU g at layer l: its experts that are not on g now
    away_LBG = (cur_LE[:, blocks_BK][:, :, :, None] != np.arange(G)).sum(axis=2)
    m = ModelBuilder()

    # Variables: p[l, b, g] = 1 if GPU g holds block b (E/G experts within the cap) at layer l;
    # f[x, b, c, g] = 1 if GPU g holds block b at layer x and block c at layer x + 1.
    pl, pb = np.nonzero(ok_LB)
    p_LBG = np.full((L, B, G), -1, dtype=np.int64)
    p_LBG[pl, pb] = m.add_vars("p", np.stack([np.repeat(pl, G), np.repeat(pb, G), np.tile(np.arange(G), len(pl))], 1),
                               True).reshape(-1, G)  # fmt: skip
    fx, fb, fc = np.nonzero(ok_LB[:-1, :, None] & ok_LB[1:, None, :])
    F = len(fx)
    keys = np.stack([np.repeat(fx, G), np.repeat(fb, G), np.repeat(fc, G), np.tile(np.arange(G), F)], 1)
    f_FG = m.add_vars("f", keys, False, np.repeat(w_XBC[fx, fb, fc], G)).reshape(F, G)

    # Constraints. Every expert of every layer is in exactly one chosen block.
    pv = p_LBG[pl, pb]  # [n, G]
    e_rows = np.repeat(pl * E, k * G).reshape(-1, k, G) + blocks_BK[pb][:, :, None]
    m.add_rows(e_rows.reshape(-1), np.repeat(pv[:, None, :], k, axis=1).reshape(-1), 1.0, 1.0, 1.0)
    # Every GPU holds exactly one block of each layer.
    m.add_rows(np.repeat(pl * G, G) + np.tile(np.arange(G), len(pl)), pv.reshape(-1), 1.0, 1.0, 1.0)
    # Flow: a GPU's block at layer x continues into exactly one block at x + 1, and arrives from one at x - 1.
    for own_x, own_b in ((fx, fb), (fx + 1, fc)):
        has = pl < L - 1 if own_x is fx else pl > 0
        rid = np.full((L, B), -1, dtype=np.int64)
        rid[pl[has], pb[has]] = np.arange(int(has.sum()))
        r_FG = rid[own_x, own_b][:, None] * G + np.arange(G)
        m.add_rows(
            np.concatenate([r_FG.reshape(-1), np.arange(int(has.sum()) * G)]),
            np.concatenate([f_FG.reshape(-1), pv[has].reshape(-1)]),
            np.concatenate([np.ones(F * G), -np.ones(int(has.sum()) * G)]),
            0.0,
            0.0,
        )
    # At most K experts leave their current GPU (each is one move).
    m.add_rows(np.zeros(pv.size, dtype=np.int64), pv.reshape(-1), away_LBG[pl, pb].reshape(-1), -np.inf,
               float(max_moves))  # fmt: skip

    hint_V = None
    if hint_LG is not None:
        hint_V = np.zeros(len(m.names))
        hint_V[p_LBG[np.arange(L)[:, None], hint_LG, np.arange(G)[None, :]]] = 1.0
        fidx = {(int(x), int(b), int(c)): i for i, (x, b, c) in enumerate(zip(fx, fb, fc, strict=True))}
        for x in range(L - 1):
            for g in range(G):
                hint_V[f_FG[fidx[(x, int(hint_LG[x, g]), int(hint_LG[x + 1, g]))], g]] = 1.0
    return MipModel(
        "replan-flow", m.names, **m.arrays(), hint_V=hint_V, base_cost=float(trans_int.sum()), dropped_gain=0.0,
        num_gpus=G, p_LB=p_LBG, blocks_BK=blocks_BK,
    )  # fmt: skip


def decode(model: MipModel, v_V: np.ndarray, num_layers: int, num_experts: int) -> np.ndarray:
    """Variable values -> gpu_LE int64 [L, E]."""
    if model.p_LB is None or model.blocks_BK is None:
        raise RuntimeError("bounded-move model without its decoding data")
    p_LBG = model.p_LB
    chosen_LBG = (p_LBG >= 0) & (v_V[np.maximum(p_LBG, 0)] > 0.5)
    gpu_LE = np.full((num_layers, num_experts), -1, dtype=np.int64)
    l_N, b_N, g_N = np.nonzero(chosen_LBG)
    k = model.blocks_BK.shape[1]
    gpu_LE[np.repeat(l_N, k), model.blocks_BK[b_N].reshape(-1)] = np.repeat(g_N, k)
    if (gpu_LE < 0).any():
        raise RuntimeError("bounded-move model decoded an expert without a GPU")
    return gpu_LE


def solve_bounded(
    cur_LE: np.ndarray,
    load_LE: np.ndarray,
    trans_XEE: np.ndarray,
    num_gpus: int,
    cap_L: np.ndarray,
    max_moves: int,
    hint_LE: np.ndarray | None,
    backend: str = "cpsat",
    time_limit: float = 30.0,
    seed: int = 0,
    workers: int = 2,
) -> ExactResult:
    """Solve the bounded-move model; objective and bound in the input's traffic units."""
    t0 = time.perf_counter()
    model = build_model(cur_LE, load_LE, trans_XEE, num_gpus, cap_L, max_moves, hint_LE)
    _, tscale = _integer(trans_XEE)
    sol = solve(model, backend, max(time_limit - (time.perf_counter() - t0), 0.05), seed, workers)
    info: dict[str, object] = {"backend": backend, "num_vars": model.num_vars, "num_rows": len(model.lo_R), **sol.info}
    gpu_LE = None
    objective = None
    if sol.values_V is not None:
        gpu_LE = decode(model, sol.values_V, *cur_LE.shape)
        same_XEE = gpu_LE[:-1, :, None] == gpu_LE[1:, None, :]
        objective = float((np.asarray(trans_XEE, dtype=np.float64) * same_XEE).sum())
    bound = None if sol.gain_bound is None else float(sol.gain_bound) / tscale
    if bound is not None and objective is not None:
        bound = max(bound, objective)
    return ExactResult(gpu_LE, sol.status, objective, bound, time.perf_counter() - t0, info)
