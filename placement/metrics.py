"""Plan evaluator: the metrics of ../shared/METRICS.md plus all-to-all traffic under two communication models.

``colocation`` and the ``imbalance`` figures are exactly the sums of METRICS.md (computed from the routing
graph). Traffic (docs/metrics.md gives the sums) is computed per token:

- replica choice: token t at layer l needs expert e and sits on rank s; it uses the replica on s if there is
  one, else one on s's node, else any: among the candidates (sorted by GPU id) it takes number t mod count.
  The runtime (placement/runtime/replay.py) uses the same rule, so its byte counters must equal these numbers.
- *home* (standard EP): token t lives on rank t mod G. At each layer it is dispatched once to every other rank
  holding one of its chosen experts and each of those ranks sends one combined result back.
- *follow* (ExFlow / MoETuner): the token starts on rank t mod G; at layer l it is dispatched from where it
  is to every other rank in its destination set, and the results are combined on the rank of the chosen
  replica of its primary expert (the first recorded id), where it stays for layer l+1.

Each dispatch or combine of one token to one rank moves ``token_bytes`` bytes.

Dimension key: T tokens, L MoE layers, K top-k, E experts, G GPUs, C replica candidates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from placement.graph import RoutingGraph
from placement.plan import Plan
from placement.trace.schema import RouteArrays

MODES = ("home", "follow")


@dataclass(frozen=True)
class Topology:
    """Link model of an EP group: bytes/s per GPU within a node and across nodes."""

    intra_node_bw: float = 450e9
    inter_node_bw: float = 50e9
    token_bytes: int = 2 * 4096


def colocation(plan: Plan, g: RoutingGraph) -> float:
    """Share of adjacent-layer expert pairs that one GPU can serve (METRICS.md)."""
    H_LEG = (plan.holders_LEG > 0).astype(np.float32)
    if g.trans_LEE.shape[0] == 0:
        return 1.0
    shared_XEE = np.einsum("xig,xjg->xij", H_LEG[:-1], H_LEG[1:]) > 0
    total = float(g.trans_LEE.sum())
    return float((g.trans_LEE * shared_XEE).sum()) / total if total else 1.0


def load_split(plan: Plan) -> np.ndarray:
    """float64 [L, E, G]: share of expert e's count that GPU g serves, equal over the GPUs holding e (METRICS.md)."""
    H_LEG = (plan.holders_LEG > 0).astype(np.float64)  # H_l(e) is a set of GPUs: two copies on one GPU count once
    return np.asarray(H_LEG / H_LEG.sum(axis=2, keepdims=True))


def gpu_load(plan: Plan, g: RoutingGraph) -> np.ndarray:
    """float64 [L, G]: load of each GPU, the GPUs holding an expert sharing its count equally (METRICS.md)."""
    return np.asarray(np.einsum("le,leg->lg", g.load_LE.astype(np.float64), load_split(plan)))


def imbalance(plan: Plan, g: RoutingGraph) -> tuple[np.ndarray, float, float]:
    """(per-layer max/mean [L], imbalance_max, imbalance_mean)."""
    return imbalance_of_loads(plan, g.load_LE)


def imbalance_of_loads(plan: Plan, load_LE: np.ndarray) -> tuple[np.ndarray, float, float]:
    """``imbalance`` of ``plan`` under the expert loads ``load_LE`` float [L, E] (e.g. traffic since a decision)."""
    load_LG = np.einsum("le,leg->lg", np.asarray(load_LE, dtype=np.float64), load_split(plan))
    mean_L = load_LG.mean(axis=1)
    imb_L = np.divide(load_LG.max(axis=1), mean_L, out=np.ones_like(mean_L), where=mean_L > 0)
    return imb_L, float(imb_L.max()), float(imb_L.mean())


def replica_candidates(plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """(cand_LEGC int64 [L, E, G, C], ncand_LEG [L, E, G]): the ranks a token on rank s may use for expert e.

    Same rank if it holds e; else holders on the same node; else all holders; sorted by GPU id, padded -1.
    """
    L, E, G = plan.holders_LEG.shape
    has_LEG = plan.holders_LEG > 0
    node_G = plan.node_of_gpu_G
    same_node_GG = node_G[:, None] == node_G[None, :]
    on_node_LEsG = has_LEG[:, :, None, :] & same_node_GG[None, None, :, :]
    self_LEsG = has_LEG[:, :, None, :] & np.eye(G, dtype=bool)[None, None]
    any_LEsG = np.broadcast_to(has_LEG[:, :, None, :], (L, E, G, G))
    use_self = self_LEsG.any(axis=3, keepdims=True)
    use_node = on_node_LEsG.any(axis=3, keepdims=True)
    mask_LEsG = np.where(use_self, self_LEsG, np.where(use_node, on_node_LEsG, any_LEsG))
    ncand_LEG = mask_LEsG.sum(axis=3)
    C = max(1, int(ncand_LEG.max()))
    order = np.argsort(~mask_LEsG, axis=3, kind="stable")[..., :C]
    cand = np.where(np.arange(C) < ncand_LEG[..., None], order, -1)
    return cand.astype(np.int64), ncand_LEG.astype(np.int64)


def traffic(plan: Plan, routes: RouteArrays, mode: str = "home") -> np.ndarray:
    """int64 [L, 2, G, G]: tokens sent src -> dst per layer, for dispatch (index 0) and combine (index 1).

    Multiply by ``token_bytes`` for bytes. ``mode`` is "home" or "follow" (module docstring).
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: use one of {', '.join(MODES)}")
    ids_TLK = routes.expert_ids_TLK.astype(np.int64)
    T, L, _ = ids_TLK.shape
    G = plan.num_gpus
    cand_LEGC, ncand_LEG = replica_candidates(plan)
    t_T = np.arange(T)
    src_T = t_T % G
    out = np.zeros((L, 2, G, G), dtype=np.int64)
    for l in range(L):
        e_TK = ids_TLK[:, l, :]
        valid_TK = e_TK >= 0
        e0_TK = np.where(valid_TK, e_TK, 0)
        n_TK = ncand_LEG[l, e0_TK, src_T[:, None]]
        pick_TK = t_T[:, None] % n_TK
        rank_TK = cand_LEGC[l, e0_TK, src_T[:, None], pick_TK]
        dest_TG = np.zeros((T, G), dtype=bool)
        tt, kk = np.nonzero(valid_TK)
        dest_TG[tt, rank_TK[tt, kk]] = True
        if mode == "home":
            new_T = src_T
        else:
            has_T = valid_TK.any(axis=1)
            first_T = np.argmax(valid_TK, axis=1)
            new_T = np.where(has_T, rank_TK[t_T, first_T], src_T)
        _count_pairs(out[l, 0], src_T, dest_TG, G, outgoing=True)
        _count_pairs(out[l, 1], new_T, dest_TG, G, outgoing=False)
        src_T = new_T
    return out


def _count_pairs(out_GG: np.ndarray, at_T: np.ndarray, dest_TG: np.ndarray, G: int, outgoing: bool) -> None:
    """Add one token per (t, g) with dest_TG[t, g] and g != at_T[t]: at -> g (outgoing) or g -> at."""
    mask_TG = dest_TG.copy()
    mask_TG[np.arange(at_T.size), at_T] = False
    tt, gg = np.nonzero(mask_TG)
    a = at_T[tt]
    idx = a * G + gg if outgoing else gg * G + a
    out_GG += np.bincount(idx, minlength=G * G).reshape(G, G)


def alltoall_time(plan: Plan, tokens_L2GG: np.ndarray, topo: Topology) -> np.ndarray:
    """float64 [L]: simulated all-to-all time per layer (dispatch + combine), in seconds.

    Per phase, each rank's time is max(send, receive) with send = intra-node bytes out / intra_node_bw +
    inter-node bytes out / inter_node_bw (receive alike); the phase takes the slowest rank's time.
    """
    node_G = plan.node_of_gpu_G
    same_GG = node_G[:, None] == node_G[None, :]
    b = tokens_L2GG.astype(np.float64) * topo.token_bytes
    cost_GG = np.where(same_GG, 1.0 / topo.intra_node_bw, 1.0 / topo.inter_node_bw)
    timed = b * cost_GG
    send_L2G = timed.sum(axis=3)
    recv_L2G = timed.sum(axis=2)
    return np.asarray(np.maximum(send_L2G, recv_L2G).max(axis=2).sum(axis=1))


def evaluate(
    plan: Plan,
    g: RoutingGraph,
    routes: RouteArrays | None = None,
    topo: Topology | None = None,
) -> dict[str, Any]:
    """All metrics of ``plan`` on a trace (graph for METRICS.md, routes for traffic)."""
    plan.check_trace(g.meta)
    topo = topo or Topology()
    imb_L, imb_max, imb_mean = imbalance(plan, g)
    out: dict[str, Any] = {
        "colocation": colocation(plan, g),
        "imbalance_max": imb_max,
        "imbalance_mean": imb_mean,
        "imbalance_per_layer": imb_L.tolist(),
        "num_tokens": g.num_tokens,
    }
    if routes is None:
        return out
    same_GG = plan.node_of_gpu_G[:, None] == plan.node_of_gpu_G[None, :]
    for mode in MODES:
        tok = traffic(plan, routes, mode)
        pair_GG = tok.sum(axis=(0, 1)) * topo.token_bytes
        t_L = alltoall_time(plan, tok, topo)
        out[mode] = {
            "bytes_total": int(pair_GG.sum()),
            "bytes_intra_node": int(pair_GG[same_GG].sum()),
            "bytes_inter_node": int(pair_GG[~same_GG].sum()),
            "bytes_per_token": float(pair_GG.sum()) / max(1, routes.num_tokens),
            "bytes_pair": pair_GG.tolist(),
            "alltoall_seconds_per_layer": t_L.tolist(),
            "alltoall_seconds_total": float(t_L.sum()),
        }
    out["topology"] = {
        "intra_node_bw": topo.intra_node_bw,
        "inter_node_bw": topo.inter_node_bw,
        "token_bytes": topo.token_bytes,
    }
    return out
