"""Hub copies: redundant slots spent on experts held by every GPU, balance left to a packing, colocation to labels.

Under ../shared/METRICS.md an expert held by all G GPUs is co-located with every expert of the adjacent layers,
and its load, split equally, adds count / G to every GPU: it neither unbalances a layer nor swings with the
prompt mix from GPU to GPU. A copy of expert e on one more GPU co-locates about 1/G more of e's transition pairs,
whose mass is e's share of the layer's traffic, whatever the copies e has already: so for colocation every
extra copy goes to the busiest expert not yet on every GPU (``hub_counts``), where EPLB gives it to the expert of
the most load per copy. The other experts (and the copies left over) are packed onto the GPUs by load
(``hub_packing``), as balanced on the fitted trace as EPLB's packing and without its doubled copies; the layers
of the worst robust GPU ratio are repaired by swaps (``polish_worst_layers``); then each layer's packs are given
the GPU labels that co-locate the most transition traffic with the adjacent layers (``relabel_chain``: an exact
linear assignment of packs to GPUs per layer, sweeping along the layers). Labels do not change any layer's load
split, so relabelling buys colocation at no cost in balance, fitted or unseen.

Measured on the weakly dependent DeepSeek-V3 shape of benchmarks/bench_placement.py (32 GPUs / 4 nodes, 32
redundant slots; 6 half splits, docs/benchmarks.md): EPLB 0.048 colocation; the hub packing 0.059 (1.22x) and
relabelled 0.060 (1.26x), both at a held-out imbalance_max 0.018 below EPLB's (whose doubled copies add no
capacity).

Dimension key: L layers, X layer pairs (L-1), E experts, G GPUs, N nodes, P slots, S slots per GPU, I packed
items of a layer (copies of the experts not on every GPU), B hub experts of a layer (on every GPU).
"""

from __future__ import annotations

import time

import numpy as np
from scipy.optimize import linear_sum_assignment

from placement.metrics import load_split
from placement.plan import Plan, PlanError
from placement.solvers.baselines import balanced_packing
from placement.solvers.replicate import repair_layer_slots, separate_slots
from placement.solvers.robust import LoadModel


def hub_counts(load_LE: np.ndarray, num_gpus: int, num_redundant: int) -> np.ndarray:
    """int64 [L, E]: copies of each expert, summing to E + ``num_redundant`` per layer: each extra copy goes to
    the expert of the most load among those on fewer than ``num_gpus`` GPUs (module docstring). The affinity
    solver's ``replica_counts`` (placement/solvers/replicate.py) fills the same way once experts too heavy for
    one copy have theirs; this plain rule gives every layer the same number of experts on every GPU, which
    ``hub_packing`` packs as one array."""
    load_LE = np.asarray(load_LE, dtype=np.float64)
    L, E = load_LE.shape
    G, R = num_gpus, num_redundant
    if R > E * (G - 1):
        raise PlanError(f"--redundant {R}: at most {E * (G - 1)} extra copies fit, one per GPU for each expert")
    count_LE = np.ones((L, E), dtype=np.int64)
    rows_L = np.arange(L)
    for _ in range(R):
        hot_L = np.argmax(np.where(count_LE < G, load_LE, -np.inf), axis=1)
        count_LE[rows_L, hot_L] += 1
    return count_LE


def hub_packing(load_LE: np.ndarray, num_gpus: int, num_redundant: int) -> np.ndarray:
    """phy2log int64 [L, P]: ``hub_counts``' experts on every GPU in each GPU's first slots, the remaining copies
    (load shared equally among an expert's copies) packed by load, heaviest first into the lightest GPU with room
    (``balanced_packing``), no two copies of one expert on a GPU."""
    load_LE = np.asarray(load_LE, dtype=np.float64)
    L, E = load_LE.shape
    G, P = num_gpus, E + num_redundant
    S = P // G
    count_LE = hub_counts(load_LE, G, num_redundant)
    hub_LE = count_LE == G
    B = int(hub_LE[0].sum())
    if (hub_LE.sum(axis=1) != B).any():  # pragma: no cover - hub_counts fills layers alike
        raise RuntimeError("hub_packing: layers with different numbers of hub experts")
    item_LI = np.stack([np.repeat(np.arange(E), np.where(hub_LE[l], 0, count_LE[l])) for l in range(L)])
    weight_LI = np.take_along_axis(load_LE / count_LE, item_LI, axis=1)
    pack_LI, rank_LI = balanced_packing(weight_LI, G)
    out_LGS = np.empty((L, G, S), dtype=np.int64)
    out_LGS[:, :, :B] = np.stack([np.flatnonzero(hub_LE[l]) for l in range(L)])[:, None, :]
    l_I = np.repeat(np.arange(L), item_LI.shape[1])
    out_LGS[l_I, pack_LI.reshape(-1), B + rank_LI.reshape(-1)] = item_LI.reshape(-1)
    return separate_slots(out_LGS.reshape(L, P), load_LE, G)


def relabel_chain(
    phy2log_LP: np.ndarray,
    trans_XEE: np.ndarray,
    num_gpus: int,
    num_nodes: int = 1,
    node_weight: float = 0.0,
    sweeps: int = 4,
    deadline: float = float("inf"),
) -> np.ndarray:
    """phy2log int64 [L, P] with each layer's GPUs (their slot groups) renamed to co-locate the most transition
    traffic with the adjacent layers: per layer an exact linear assignment of slot groups to GPU labels, scored
    by the traffic between a group's experts and the experts the label holds at layers l-1 and l+1 (plus
    ``node_weight`` times the traffic with the label's node); forward from layer 0 against layer l-1 first, then
    ``sweeps`` alternating sweeps against both neighbours (or until ``deadline``). Every layer keeps its load
    split, so imbalance on any trace is unchanged."""
    out = np.asarray(phy2log_LP, dtype=np.int64).copy()
    L, P = out.shape
    E, G = trans_XEE.shape[1], num_gpus
    out_LGS = out.reshape(L, G, P // G)
    gpu_P = np.arange(P) // (P // G)
    node_GN = np.zeros((G, num_nodes))
    node_GN[np.arange(G), np.arange(G) // (G // num_nodes)] = 1.0
    same_GG = np.eye(G) + node_weight * (node_GN @ node_GN.T)  # value of a pair on GPUs a, b

    def held(l: int) -> np.ndarray:
        h_EG = np.zeros((E, G))
        h_EG[out_LGS[l].reshape(-1), gpu_P] = 1.0
        return h_EG

    for sweep in range(sweeps + 1):
        for l in range(L) if sweep % 2 == 0 else range(L - 1, -1, -1):
            if sweep and time.perf_counter() > deadline:
                return out_LGS.reshape(L, P)
            here_EG = held(l)
            w_GG = np.zeros((G, G))  # [label, group]
            if l > 0:
                w_GG += same_GG @ (held(l - 1).T @ trans_XEE[l - 1] @ here_EG)
            if l < L - 1 and sweep:
                w_GG += same_GG @ (here_EG.T @ trans_XEE[l] @ held(l + 1)).T
            _, group_G = linear_sum_assignment(-w_GG)
            out_LGS[l] = out_LGS[l][group_G]
    return out_LGS.reshape(L, P)


def polish_worst_layers(
    phy2log_LP: np.ndarray,
    trans_XEE: np.ndarray,
    lm: LoadModel,
    num_gpus: int,
    deadline: float,
    layers: int | None = None,
) -> np.ndarray:
    """phy2log int64 [L, P] with the ``layers`` (default all) layers of the highest robust GPU ratio (``lm``:
    whole experts, shares plus kappa standard deviations on unseen prompts, placement/solvers/robust.py) repaired
    by swaps of single-copy experts until no swap lowers their worst GPU, worst layer first, until ``deadline``;
    each step takes the swap that loses the least traffic co-located with layers l-1 and l+1 per unit of ratio
    (``repair_balance``; a copy carries 1/copies of its expert's share and deviation, as in ``robust_repair``).
    imbalance_max is a maximum over layers, so the worst layers move it first."""
    out = np.asarray(phy2log_LP, dtype=np.int64).copy()
    L = out.shape[0]
    E, G = lm.share_LE.shape[1], num_gpus
    split_LEG = load_split(Plan(G, 1, E, tuple(range(L)), out))
    var_LG = np.einsum("leg,lef,lfg->lg", split_LEG, lm.cov_LEE, split_LEG)
    ratio_LG = G * (np.einsum("le,leg->lg", lm.share_LE, split_LEG) + lm.kappa * np.sqrt(np.maximum(var_LG, 0.0)))
    for l in np.argsort(-ratio_LG.max(axis=1))[: L if layers is None else layers]:
        if time.perf_counter() > deadline:
            break
        out[l] = repair_layer_slots(out, l, trans_XEE, lm, num_gpus, 1.0, deadline)
    return out
