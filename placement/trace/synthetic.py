"""Synthetic routing traces with realistic structure, for benchmarks at sizes no public trace has
(DeepSeek-V3: 58 MoE layers x 256 experts, top-8; Kimi-K2: 60 x 384, top-8).

Model: each prompt has a latent topic (one of C). Each layer has a log-normal expert popularity (hot
experts: busiest / mean about 2) and, per topic, a preferred set of ``num_preferred`` (default E/16) experts.
A token draws each of its K experts, with probability ``follow``, from its topic's preferred set at that layer,
otherwise from the layer's popularity; repeated ids are redrawn. Consecutive layers are thus dependent through
the topic, as real traces are (adjacent-layer concentration about twice the independent value). With ``chain`` > 0
a token also carries its own state from layer to layer, as a real token's hidden state does: with probability
``chain`` each of its experts at layer l > 0 is one of ``num_successors`` fixed successors of its expert at l-1
(a per-layer random map), instead of the topic or popularity draw. That dependence is per token, so co-locating
it does not concentrate prompt-mix swings on a GPU as topic dependence does. Vectorised over tokens; loops run
over layers only.

Dimension key: T tokens, L layers, E experts, K top-k, C topics, S prompts.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from placement.trace.schema import RouteArrays, TraceMeta


def synthetic_trace(
    num_layers: int,
    num_experts: int,
    top_k: int,
    num_tokens: int,
    *,
    num_topics: int = 32,
    num_preferred: int | None = None,
    follow: float = 0.7,
    skew_sigma: float = 0.4,
    tokens_per_prompt: int = 64,
    seed: int = 0,
    model_name: str = "synthetic",
    topic_probs: np.ndarray | None = None,
    chain: float = 0.0,
    num_successors: int = 2,
) -> tuple[TraceMeta, RouteArrays]:
    """A synthetic trace: (meta, routes) with int16 expert ids [T, L, K] and prompt ids. ``topic_probs`` [C]
    (default uniform) is the prompts' topic mix; the same seed with another mix gives the same model (popularity
    and preferred sets) under shifted traffic. ``chain`` = 0 draws exactly what it drew before the option existed."""
    L, E, K, T = num_layers, num_experts, top_k, num_tokens
    M = min(num_preferred or max(1, E // 16), E)
    rng = np.random.default_rng(seed)
    pop_LE = rng.lognormal(0.0, skew_sigma, size=(L, E))
    cdf_LE = np.cumsum(pop_LE / pop_LE.sum(axis=1, keepdims=True), axis=1)
    C = num_topics
    pref_LCM = np.stack([np.stack([rng.choice(E, M, replace=False) for _ in range(C)]) for _ in range(L)])
    S = -(-T // tokens_per_prompt)
    seq_T = np.repeat(np.arange(S, dtype=np.int64), tokens_per_prompt)[:T]
    pos_T = np.tile(np.arange(tokens_per_prompt, dtype=np.int32), S)[:T]
    topic_T = (rng.integers(C, size=S) if topic_probs is None else rng.choice(C, size=S, p=topic_probs))[seq_T]

    def draw(l: int, shape: tuple[int, ...]) -> np.ndarray:
        return np.minimum(np.searchsorted(cdf_LE[l], rng.random(shape)), E - 1)

    ids_TLK = np.empty((T, L, K), dtype=np.int64)
    for l in range(L):
        topical_TK = pref_LCM[l][topic_T[:, None], rng.integers(M, size=(T, K))]
        ids_TLK[:, l] = np.where(rng.random((T, K)) < follow, topical_TK, draw(l, (T, K)))
    if chain > 0:  # drawn after the rest, so that chain = 0 leaves every earlier seeded trace as it was
        succ_LEN = rng.integers(E, size=(L, E, num_successors))
        for l in range(1, L):
            chained_TK = rng.random((T, K)) < chain
            next_TK = succ_LEN[l][ids_TLK[:, l - 1], rng.integers(num_successors, size=(T, K))]
            ids_TLK[:, l] = np.where(chained_TK, next_TK, ids_TLK[:, l])
    for l in range(L):
        for _ in range(8):  # redraw repeated ids (rare after a few passes)
            srt_TK = np.sort(ids_TLK[:, l], axis=1)
            dup_T = (srt_TK[:, 1:] == srt_TK[:, :-1]).any(axis=1)
            if not dup_T.any():
                break
            rows = np.flatnonzero(dup_T)
            ids_TLK[rows, l] = _dedupe_rows(ids_TLK[rows, l], draw(l, (rows.size, K)))
    meta = TraceMeta(model_name, E, K, tuple(range(L)), source="synthetic")
    return meta, RouteArrays(ids_TLK.astype(np.int16), seq_T, pos_T)


def _dedupe_rows(ids_RK: np.ndarray, fresh_RK: np.ndarray) -> np.ndarray:
    """Replace every id that repeats an earlier id of its row with the fresh draw at that position."""
    K = ids_RK.shape[1]
    earlier_RKK = (ids_RK[:, :, None] == ids_RK[:, None, :]) & np.tril(np.ones((K, K), dtype=bool), -1)
    repeat_RK = earlier_RKK.any(axis=2)
    return np.where(repeat_RK, fresh_RK, ids_RK)


def skewed_top1_trace(
    num_layers: int,
    num_experts: int,
    num_tokens: int,
    *,
    hot_layer: int = 0,
    hot_share: float = 0.999,
    seed: int = 0,
    model_name: str = "synthetic-skewed-top1",
    **kwargs: Any,
) -> tuple[TraceMeta, RouteArrays]:
    """A top-1 trace (``synthetic_trace`` with K = 1) in which layer ``hot_layer`` sends ``hot_share`` of its tokens
    to one expert (expert 0), as very skewed top-1 routers do; the other layers keep the topic structure."""
    meta, routes = synthetic_trace(num_layers, num_experts, 1, num_tokens, seed=seed, model_name=model_name, **kwargs)
    rng = np.random.default_rng(seed + 1)
    ids_TLK = routes.expert_ids_TLK.copy()
    hot_T = rng.random(num_tokens) < hot_share
    ids_TLK[hot_T, hot_layer, 0] = 0
    cold_T = ~hot_T & (ids_TLK[:, hot_layer, 0] == 0)  # the rest go to the other experts
    ids_TLK[cold_T, hot_layer, 0] = rng.integers(1, num_experts, size=int(cold_T.sum()))
    return meta, RouteArrays(ids_TLK, routes.seq_ids_T, routes.token_pos_T)
