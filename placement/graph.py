"""Routing-dependency graph: per-layer loads, layer-to-layer transitions and within-layer co-activation.

Counts follow ../shared/METRICS.md: a negative id is skipped and a repeated id counts once, so for token t
the chosen set S_l(t) adds 1 to ``load_LE[l, e]`` for each e in S_l(t), 1 to ``trans_LEE[l, i, j]`` for each
i in S_l(t), j in S_{l+1}(t), and 1 to ``coact_LEE[l, i, j]`` for each ordered pair i != j in S_l(t).
Without -1 and repeated ids, per-layer load sums are T*K and transition sums T*K^2.

Dimension key: T tokens, L MoE layers, K top-k, E experts, S prompt folds, D bootstrap draws.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numba
import numpy as np

from placement.trace.importers.popularity import LoadTrace
from placement.trace.schema import RouteArrays, TraceMeta

if TYPE_CHECKING:
    import networkx as nx

    from placement.trace.dataset import Trace


@numba.njit(parallel=True, cache=True, nogil=True)
def _layer_major_sets(ids_TLK: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """out int [L, T, K]: the ids layer-major, each repeated id of a token's list replaced by -1 (sets S_l(t))."""
    T, L, K = ids_TLK.shape
    for l in numba.prange(L):
        for t in range(T):
            for k in range(K):
                e = ids_TLK[t, l, k]
                for q in range(k):
                    if ids_TLK[t, l, q] == e:
                        e = -1
                        break
                out[l, t, k] = e


@numba.njit(parallel=True, cache=True, nogil=True)
def _accumulate(
    sets_LTK: np.ndarray,
    fold_T: np.ndarray,
    load_SLE: np.ndarray,
    trans_LEE: np.ndarray,
    coact_LEE: np.ndarray,
    with_coact: bool,
) -> None:  # pragma: no cover - compiled
    """Count loads (per fold), transitions and co-activations of layer-major sets (-1 = absent), in parallel
    over layers."""
    L, T, K = sets_LTK.shape
    for l in numba.prange(L):
        a = sets_LTK[l]
        for t in range(T):
            s = fold_T[t]
            for q in range(K):
                e = a[t, q]
                if e >= 0:
                    load_SLE[s, l, e] += 1
                    if with_coact:
                        row_c = coact_LEE[l, e]
                        for r in range(K):
                            f = a[t, r]
                            if r != q and f >= 0:
                                row_c[f] += 1
            if l + 1 < L:
                b = sets_LTK[l + 1]
                for q in range(K):
                    i = a[t, q]
                    if i < 0:
                        continue
                    row = trans_LEE[l, i]
                    for r in range(K):
                        j = b[t, r]
                        if j >= 0:
                            row[j] += 1


# Prompt folds for the robust balance and the unseen-imbalance forecast: enough for a full-rank expert-share
# covariance at E <= 255 and a fold bootstrap, small next to the transition counts.
PROMPT_FOLDS = 256


def fold_of_seq(seq_ids_T: np.ndarray, num_folds: int) -> np.ndarray:
    """Deterministic fold of each token's prompt (64-bit multiplicative hash of the seq id, high bits folded
    into the low ones so that any modulus spreads prompts evenly), int64 [T]."""
    h = np.asarray(seq_ids_T).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    h ^= h >> np.uint64(29)
    return (h % np.uint64(num_folds)).astype(np.int64)


def nonempty_folds(fold_load_SLE: np.ndarray) -> np.ndarray:
    """float64 [S', L, E]: the prompt folds with load in every layer."""
    f_SLE = np.asarray(fold_load_SLE, dtype=np.float64)
    return f_SLE[(f_SLE.sum(axis=2) > 0).all(axis=1)]


def effective_prompts(fold_load_SLE: np.ndarray | None) -> float:
    """Kish effective number of the prompt folds by token mass, (sum_s n_s)^2 / sum_s n_s^2 with n_s a fold's load
    at the first layer: S for folds of equal size, far fewer where a few long prompts carry most tokens (the
    DeepSeek-V2-Lite dev file: 90 from 252 folds of 999 prompts; a window of 125 of its prompts: 10-24). 0.0
    without folds."""
    if fold_load_SLE is None:
        return 0.0
    n_S = nonempty_folds(fold_load_SLE)[:, 0].sum(axis=1)
    return float(n_S.sum() ** 2 / max(float((n_S**2).sum()), 1e-12))


def unseen_share_draws(
    load_LE: np.ndarray, fold_load_SLE: np.ndarray, holdout_ratio: float, draws: int, seed: int
) -> np.ndarray | None:
    """float64 [D, L, E]: per-layer expert shares of unseen traffic ``holdout_ratio`` times the trace's size, one
    row per bootstrap draw of the prompt folds (the folds with load in every layer, resampled with replacement),
    each draw's deviation from the trace's shares scaled by sqrt(1 + 1/ratio) (training error plus unseen
    sampling error) and clipped at 0. None with fewer than 8 such folds. The one resampling behind every
    unseen-traffic forecast (placement/solvers/robust.py, placement/timemodel.py, placement/replan/solve.py)."""
    f_SLE = nonempty_folds(fold_load_SLE)
    S, L, E = f_SLE.shape
    if S < 8:
        return None
    load_LE = np.asarray(load_LE, dtype=np.float64)
    share_LE = load_LE / np.maximum(load_LE.sum(axis=1, keepdims=True), 1e-12)
    w_DS = np.random.default_rng(seed).multinomial(S, np.full(S, 1.0 / S), size=draws).astype(np.float64)
    boot_DLE = (w_DS @ f_SLE.reshape(S, L * E)).reshape(draws, L, E)
    boot_DLE /= np.maximum(boot_DLE.sum(axis=2, keepdims=True), 1e-12)
    return np.maximum(share_LE + np.sqrt(1.0 + 1.0 / max(holdout_ratio, 1e-9)) * (boot_DLE - share_LE), 0.0)


@dataclass(frozen=True)
class RoutingGraph:
    """Counts of a trace. load_LE int64 [L, E]; trans_LEE int64 [L-1, E, E]; coact_LEE int64 [L, E, E] or None;
    fold_load_SLE int64 [S, L, E]: loads of S disjoint prompt folds (sum = load_LE), or None without seq ids."""

    meta: TraceMeta
    num_tokens: int
    load_LE: np.ndarray
    trans_LEE: np.ndarray
    coact_LEE: np.ndarray | None = None
    fold_load_SLE: np.ndarray | None = None

    @property
    def num_layers(self) -> int:
        return int(self.load_LE.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.load_LE.shape[1])

    def keep_top_pairs(self, m: int) -> RoutingGraph:
        """Keep only each expert's ``m`` heaviest next-layer (and co-activated) partners; the rest become 0."""
        return replace(
            self,
            trans_LEE=keep_top_per_row(self.trans_LEE, m),
            coact_LEE=None if self.coact_LEE is None else keep_top_per_row(self.coact_LEE, m),
        )

    def to_networkx(self, min_weight: int = 1) -> nx.DiGraph:
        """Directed graph: nodes ``(layer_index, expert)`` with ``load`` and ``layer_id``; edges l -> l+1 with
        ``weight`` = transition count (only edges with weight >= ``min_weight``)."""
        import networkx as nx

        g = nx.DiGraph(model=self.meta.model_name, num_tokens=self.num_tokens)
        L, E = self.load_LE.shape
        for l in range(L):
            for e in range(E):
                g.add_node((l, e), layer_id=int(self.meta.layers[l]), expert=e, load=int(self.load_LE[l, e]))
        l_X, i_X, j_X = np.nonzero(self.trans_LEE >= max(1, min_weight))
        w_X = self.trans_LEE[l_X, i_X, j_X]
        g.add_weighted_edges_from(
            ((int(l), int(i)), (int(l) + 1, int(j)), int(w)) for l, i, j, w in zip(l_X, i_X, j_X, w_X, strict=True)
        )
        return g

    def write_graphml(self, path: str | Path, min_weight: int = 1) -> None:
        """GraphML export (node ids ``"L{layer}E{expert}"``), written atomically."""
        import networkx as nx

        from placement.trace.dataset import atomic_write_bytes

        g = self.to_networkx(min_weight)
        g = nx.relabel_nodes(g, {n: f"L{n[0]}E{n[1]}" for n in g.nodes})
        atomic_write_bytes(Path(path), "\n".join(nx.generate_graphml(g)).encode())


def keep_top_per_row(w_XEE: np.ndarray, m: int) -> np.ndarray:
    """w_XEE with all but the m largest entries of each row set to 0."""
    E = w_XEE.shape[-1]
    if m >= E:
        return w_XEE.copy()
    idx = np.argpartition(w_XEE, E - m, axis=-1)[..., E - m :]
    out = np.zeros_like(w_XEE)
    np.put_along_axis(out, idx, np.take_along_axis(w_XEE, idx, axis=-1), axis=-1)
    return out


class GraphAccumulator:
    """Streaming builder: ``add`` batches of token-major routes, then ``result()``.

    The kernel counts into int32 tables (half the cache footprint of int64: a 256 x 256 layer pair fits L2),
    flushed into the int64 totals before any count could overflow. Loads are counted per prompt fold (fold 0
    only without folds) in the same pass; ``load_LE`` is their sum.
    """

    def __init__(self, meta: TraceMeta, with_coact: bool = True, num_folds: int = 8) -> None:
        L, E, K = meta.num_layers, meta.num_experts, meta.top_k
        self.meta = meta
        self.num_folds = max(1, num_folds)
        self.with_folds = num_folds > 1
        self.with_coact = with_coact
        self.num_tokens = 0
        self.fold_load_SLE = np.zeros((self.num_folds, L, E), dtype=np.int64)
        self.trans_LEE = np.zeros((max(L - 1, 0), E, E), dtype=np.int64)
        self.coact_LEE = np.zeros((L, E, E) if with_coact else (1, 1, 1), dtype=np.int64)
        self._fold32 = np.zeros(self.fold_load_SLE.shape, dtype=np.int32)
        self._trans32 = np.zeros((max(L - 1, 1), E, E) if L > 1 else (1, 1, 1), dtype=np.int32)
        self._coact32 = np.zeros(self.coact_LEE.shape, dtype=np.int32)
        self._pending = 0
        self._max_pending = (2**31 - 1) // max(1, K * K)
        self._sets_flat = np.empty(0, dtype=np.int16)

    def _sets_buffer(self, ids_TLK: np.ndarray) -> np.ndarray:
        """A reused [L, T, K] buffer (fresh 60 MB per batch costs page faults on every batch)."""
        T, L, K = ids_TLK.shape
        if self._sets_flat.dtype != ids_TLK.dtype or self._sets_flat.size < T * L * K:
            self._sets_flat = np.empty(T * L * K, dtype=ids_TLK.dtype)
        return self._sets_flat[: T * L * K].reshape(L, T, K)

    def _flush(self) -> None:
        if not self._pending:
            return
        self.fold_load_SLE += self._fold32
        if self.trans_LEE.shape[0]:
            self.trans_LEE += self._trans32
        if self.with_coact:
            self.coact_LEE += self._coact32
        for buf in (self._fold32, self._trans32, self._coact32):
            buf.fill(0)
        self._pending = 0

    def add(self, ids_TLK: np.ndarray, seq_ids_T: np.ndarray | None = None) -> None:
        """Count T tokens; ``seq_ids_T`` (their prompts) feeds the fold loads (dropped if ever missing)."""
        ids = np.ascontiguousarray(ids_TLK)
        if ids.dtype not in (np.int16, np.int32, np.int64):
            ids = ids.astype(np.int32)
        T = int(ids.shape[0])
        if seq_ids_T is None:
            self.with_folds = False
            folds_T = np.zeros(T, dtype=np.int64)
        else:
            folds_T = fold_of_seq(seq_ids_T, self.num_folds) if self.with_folds else np.zeros(T, dtype=np.int64)
        for a in range(0, T, self._max_pending):
            part = ids[a : a + self._max_pending]
            if self._pending + part.shape[0] > self._max_pending:
                self._flush()
            sets_LTK = self._sets_buffer(part)
            _layer_major_sets(part, sets_LTK)
            fold_T = folds_T[a : a + self._max_pending]
            _accumulate(sets_LTK, fold_T, self._fold32, self._trans32, self._coact32, self.with_coact)
            self._pending += int(part.shape[0])
        self.num_tokens += T

    def result(self) -> RoutingGraph:
        self._flush()
        return RoutingGraph(
            self.meta,
            self.num_tokens,
            self.fold_load_SLE.sum(axis=0),
            self.trans_LEE,
            self.coact_LEE if self.with_coact else None,
            self.fold_load_SLE if self.with_folds else None,
        )


def graph_from_routes(
    ids_TLK: np.ndarray,
    meta: TraceMeta,
    with_coact: bool = True,
    seq_ids_T: np.ndarray | None = None,
    num_folds: int = PROMPT_FOLDS,
) -> RoutingGraph:
    """Graph of an in-memory trace (int [T, L, K] expert ids; seq ids [T] for the fold loads)."""
    acc = GraphAccumulator(meta, with_coact, num_folds if seq_ids_T is not None else 0)
    acc.add(ids_TLK, seq_ids_T)
    return acc.result()


def build_graph(
    trace: Trace,
    *,
    with_coact: bool = True,
    batch_tokens: int = 65536,
    keep_top: int | None = None,
    num_folds: int = 0,
    on_progress: Callable[[int], None] | None = None,
) -> RoutingGraph:
    """Stream a trace (Parquet dataset or in-memory) record batch by record batch into its graph.

    ``num_folds`` > 1 also counts loads per prompt fold (reads the seq_id column), which the robust balance of
    the affinity solver (``--robust``) and the unseen-imbalance forecast need; off by default."""
    acc = GraphAccumulator(trace.meta, with_coact, num_folds)
    # Decoding the next batch on a second thread overlaps Parquet decode with the (GIL-free) kernels:
    # 11.9 vs 11.0 M rows/s median, interleaved runs, 20 M rows of DeepSeek-V3 shape on 2 cores.
    stream = trace.iter_batches(batch_tokens, with_ids=num_folds > 1, with_pos=False)
    batches: Iterable[RouteArrays] = _prefetched(stream)
    for batch in batches:
        acc.add(batch.expert_ids_TLK, batch.seq_ids_T if num_folds > 1 else None)
        if on_progress is not None:
            on_progress(batch.num_tokens)
    g = acc.result()
    return g.keep_top_pairs(keep_top) if keep_top else g


def _prefetched(batches: Iterator[RouteArrays], depth: int = 2) -> Iterator[RouteArrays]:
    """Decode the next record batches on a background thread while the (GIL-free) kernel counts this one."""
    q: queue.Queue[object] = queue.Queue(maxsize=depth)
    done = object()
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            for b in batches:
                q.put(b)
        except BaseException as exc:  # handed to the consumer below
            errors.append(exc)
        finally:
            q.put(done)

    thread = threading.Thread(target=produce, name="moeplace-decode", daemon=True)
    thread.start()
    while (item := q.get()) is not done:
        yield item  # type: ignore[misc]
    thread.join()
    if errors:
        raise errors[0]


# ------------------------------------------------------------------------------------------------ statistics


def _entropy_bits(p_XE: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p_XE > 0, -p_XE * np.log2(p_XE), 0.0)
    return np.asarray(terms.sum(axis=-1))


def graph_stats(g: RoutingGraph, top_m: int | None = None) -> dict[str, Any]:
    """Per-layer load skew, transition concentration vs. the independence baseline, and routing entropy.

    - ``load_skew[l]`` = max_e load / mean_e load.
    - ``concentration[l]`` (l -> l+1): sum over i of (traffic of i to its ``top_m`` heaviest next experts)
      divided by all traffic of layer pair l; ``independent[l]``: the same if layer l+1 were chosen
      independently of layer l (each row distributed like the column marginal: the top_m share of the marginal).
    - ``entropy_bits[l]``: entropy of the load distribution; ``cond_entropy_bits[l]``: H(layer l+1 | layer l)
      of the transition distribution (lower than entropy_bits[l+1] when routing is dependent).
    """
    L, E = g.load_LE.shape
    m = top_m if top_m is not None else max(1, E // 8)
    load = g.load_LE.astype(np.float64)
    mean_L = load.mean(axis=1)
    skew_L = np.divide(load.max(axis=1), mean_L, out=np.zeros(L), where=mean_L > 0)
    p_LE = load / np.maximum(load.sum(axis=1, keepdims=True), 1)
    ent_L = _entropy_bits(p_LE)
    trans = g.trans_LEE.astype(np.float64)
    tot_X = trans.sum(axis=(1, 2))
    top_XE = -np.sort(-trans, axis=2)[:, :, :m].sum(axis=2)
    conc_X = np.divide(top_XE.sum(axis=1), tot_X, out=np.zeros_like(tot_X), where=tot_X > 0)
    col_XE = trans.sum(axis=1)
    colp_XE = col_XE / np.maximum(col_XE.sum(axis=1, keepdims=True), 1)
    indep_X = -np.sort(-colp_XE, axis=1)[:, :m].sum(axis=1)
    row_XE = trans.sum(axis=2)
    rowp_XE = row_XE / np.maximum(row_XE.sum(axis=1, keepdims=True), 1)
    cond_XEE = trans / np.maximum(row_XE[:, :, None], 1)
    cond_ent_X = (rowp_XE * _entropy_bits(cond_XEE)).sum(axis=1)
    return {
        "model": g.meta.model_name,
        "num_tokens": g.num_tokens,
        "num_layers": L,
        "num_experts": E,
        "top_k": g.meta.top_k,
        "layers": list(g.meta.layers),
        "top_m": m,
        "load_sum": g.load_LE.sum(axis=1).tolist(),
        "trans_sum": g.trans_LEE.sum(axis=(1, 2)).tolist(),
        "load_skew": skew_L.tolist(),
        "concentration": conc_X.tolist(),
        "independent": indep_X.tolist(),
        "entropy_bits": ent_L.tolist(),
        "cond_entropy_bits": cond_ent_X.tolist(),
        "summary": {
            "load_skew_max": float(skew_L.max()) if L else 0.0,
            "load_skew_mean": float(skew_L.mean()) if L else 0.0,
            "concentration_mean": float(conc_X.mean()) if conc_X.size else 0.0,
            "independent_mean": float(indep_X.mean()) if indep_X.size else 0.0,
            "entropy_bits_mean": float(ent_L.mean()) if L else 0.0,
            "max_entropy_bits": float(np.log2(E)),
        },
    }


def load_stats(lt: LoadTrace) -> dict[str, Any]:
    """The load part of ``graph_stats`` (load sums, skew, entropy) for a loads-only trace."""
    L, E = lt.load_LE.shape
    meta = TraceMeta(lt.model_name, E, 1, lt.layers, source=lt.source)
    g = RoutingGraph(meta, lt.num_tokens or 0, lt.load_LE, np.zeros((max(L - 1, 0), E, E), np.int64))
    s = graph_stats(g)
    for key in ("top_m", "trans_sum", "concentration", "independent", "cond_entropy_bits", "top_k"):
        s.pop(key)
    for key in ("concentration_mean", "independent_mean"):
        s["summary"].pop(key)
    s["loads_only"] = True
    return s
