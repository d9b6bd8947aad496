"""Routing-trace schema: the one data type every stage of moeplace reads.

A trace dataset is a directory of Parquet shards (plus ``_dataset.parquet``, zero rows, the metadata) with one
row per token per MoE layer.
Rows of a shard are token-major: the L rows of one token are consecutive, in the order of ``meta.layers``.

Columns (schema version 1):

===============  =======================  ==================================================================
column           type                     meaning
===============  =======================  ==================================================================
``run_id``       string                   who recorded it (writer id; several writers share one dataset)
``seq_id``       int64                    prompt / sequence id (used to split train and held-out prompts)
``token_pos``    int32                    position of the token in its sequence
``layer``        int16                    model layer id of this MoE layer (one of ``meta.layers``)
``expert_ids``   list<int16>              top-k logical expert ids, length K (-1 = not recorded)
``gate_weights`` list<float32>, nullable  gate weights of those experts as the router used them
===============  =======================  ==================================================================

Key-value metadata of every shard: ``moeplace.schema_version`` and ``moeplace.meta`` (``TraceMeta`` as JSON).

Dimension key: T tokens, L MoE layers, K top-k, E experts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 1
META_KEY = b"moeplace.meta"
VERSION_KEY = b"moeplace.schema_version"


class TraceError(ValueError):
    """Bad trace input; the message is one line naming the file or field and how to fix it."""


@dataclass(frozen=True)
class TraceMeta:
    """Model metadata of a trace: what the expert ids mean.

    ``layers`` are the model layer ids of the L MoE layers (dense layers excluded), in forward order.
    """

    model_name: str
    num_experts: int
    top_k: int
    layers: tuple[int, ...]
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        if self.num_experts < 1 or self.num_experts > 32767:
            raise TraceError(f"num_experts={self.num_experts}: must be in 1..32767")
        if self.top_k < 1 or self.top_k > self.num_experts:
            raise TraceError(f"top_k={self.top_k}: must be in 1..num_experts ({self.num_experts})")
        if not self.layers:
            raise TraceError("layers is empty: a trace needs at least one MoE layer id")
        if len(set(self.layers)) != len(self.layers):
            raise TraceError(f"layers {list(self.layers)} has repeated layer ids")
        if min(self.layers) < 0 or max(self.layers) > 32767:  # the int16 layer column
            raise TraceError(f"layers {_short(self.layers)}: model layer ids must lie in 0..32767")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def compatible_with(self, other: TraceMeta) -> bool:
        """Same model shape: traces of the two may share one dataset."""
        return (self.model_name, self.num_experts, self.top_k, self.layers) == (
            other.model_name,
            other.num_experts,
            other.top_k,
            other.layers,
        )

    def fingerprint(self) -> str:
        key = f"{self.model_name}|{self.num_experts}|{self.top_k}|{','.join(map(str, self.layers))}"
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "trace metadata") -> TraceMeta:
        try:
            d = json.loads(text)
            if not isinstance(d, dict):
                raise TraceError(f"{where}: moeplace metadata is a JSON object, got {type(d).__name__}")
            version = int(d.get("schema_version", SCHEMA_VERSION))
            if version != SCHEMA_VERSION:
                raise TraceError(
                    f"{where}: trace schema version {version}, this moeplace reads version {SCHEMA_VERSION}; "
                    "re-import the trace with this version"
                )
            return cls(
                model_name=str(d["model_name"]),
                num_experts=int(d["num_experts"]),
                top_k=int(d["top_k"]),
                layers=tuple(int(x) for x in d["layers"]),
                source=str(d.get("source", "")),
                extra=dict(d.get("extra", {})),
            )
        except TraceError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise TraceError(f"{where}: malformed moeplace metadata ({exc!r}); re-import the trace") from exc


def _short(xs: tuple[int, ...]) -> str:
    return str(list(xs)) if len(xs) <= 6 else f"[{xs[0]}, {xs[1]}, ..., {xs[-1]}] ({len(xs)} ids)"


def arrow_schema(meta: TraceMeta | None = None) -> pa.Schema:
    """The Parquet/Arrow schema of a trace shard, with ``meta`` in its key-value metadata."""
    schema = pa.schema(
        [
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("seq_id", pa.int64(), nullable=False),
            pa.field("token_pos", pa.int32(), nullable=False),
            pa.field("layer", pa.int16(), nullable=False),
            pa.field("expert_ids", pa.list_(pa.field("item", pa.int16(), nullable=False)), nullable=False),
            pa.field("gate_weights", pa.list_(pa.field("item", pa.float32(), nullable=False)), nullable=True),
        ]
    )
    if meta is not None:
        schema = schema.with_metadata({META_KEY: meta.to_json().encode(), VERSION_KEY: str(SCHEMA_VERSION)})
    return schema


@dataclass(frozen=True)
class RouteArrays:
    """A whole trace (or a batch of one) in memory, token-major.

    expert_ids_TLK: int16 [T, L, K], -1 where not recorded.
    seq_ids_T: int64 [T]; token_pos_T: int32 [T]; gate_weights_TLK: float32 [T, L, K] or None.
    """

    expert_ids_TLK: np.ndarray
    seq_ids_T: np.ndarray
    token_pos_T: np.ndarray
    gate_weights_TLK: np.ndarray | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.expert_ids_TLK.shape[0])

    def take(self, index_T: np.ndarray) -> RouteArrays:
        """The tokens selected by ``index_T`` (a boolean mask or integer indices)."""
        gates = None if self.gate_weights_TLK is None else self.gate_weights_TLK[index_T]
        return RouteArrays(self.expert_ids_TLK[index_T], self.seq_ids_T[index_T], self.token_pos_T[index_T], gates)


def validate_routes(expert_ids_TLK: np.ndarray, meta: TraceMeta, where: str) -> None:
    """Raise TraceError unless ids have shape [T, L, K] and lie in -1..E-1 (vectorised)."""
    if expert_ids_TLK.ndim != 3:
        raise TraceError(f"{where}: expert ids must have shape [T, L, K], got {expert_ids_TLK.shape}")
    _, L, K = expert_ids_TLK.shape
    if L != meta.num_layers or K != meta.top_k:
        raise TraceError(
            f"{where}: expert ids have L={L}, K={K} but the metadata says L={meta.num_layers}, K={meta.top_k}"
        )
    if expert_ids_TLK.size:
        hi = int(expert_ids_TLK.max())
        lo = int(expert_ids_TLK.min())
        if hi >= meta.num_experts:
            raise TraceError(
                f"{where}: expert id {hi} >= num_experts={meta.num_experts}; "
                "pass the model's real expert count (--num-experts) or map physical ids to logical ids"
            )
        if lo < -1:
            raise TraceError(f"{where}: expert id {lo} < -1; use -1 for 'not recorded'")


def one_line(exc: BaseException, limit: int = 200) -> str:
    """A library's exception message as one line (pyarrow's and zipfile's span several), cut to ``limit``."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


_F32_MAX = float(np.finfo(np.float32).max)


def validate_gates(
    gate_weights_TLK: np.ndarray, meta: TraceMeta, where: str, seq_ids_T: np.ndarray, token_pos_T: np.ndarray
) -> None:
    """Raise TraceError at the first gate weight (token-major order) that is NaN, infinite, negative or too large
    for float32, naming its token (seq_id, token_pos), model layer and top-k slot (vectorised)."""
    g = np.asarray(gate_weights_TLK)
    if g.dtype.kind not in "fiu":
        raise TraceError(f"{where}: gate weights must be numbers, got dtype {g.dtype}")
    bad_TLK = ~(np.isfinite(g) & (g >= 0) & (g <= _F32_MAX))
    if not bad_TLK.any():
        return
    t, l, k = (int(i) for i in np.unravel_index(int(np.argmax(bad_TLK)), g.shape))
    v = float(g[t, l, k])
    what = "NaN" if np.isnan(v) else "negative" if v < 0 else "infinite" if np.isinf(v) else "too large for float32"
    raise TraceError(
        f"{where}: gate weight {v} is {what} at token seq_id={int(seq_ids_T[t])} token_pos={int(token_pos_T[t])}, "
        f"layer {meta.layers[l]}, top-k slot {k} ({int(bad_TLK.sum())} bad weights in all); gate weights must be "
        "finite and >= 0: fix the source's gate weights or leave them out of it"
    )


def check_counts(count: np.ndarray, where: str, dims: tuple[str, ...]) -> np.ndarray:
    """int64 ``count`` after checking that every entry is a whole number >= 0; else a TraceError naming the first
    offending position by ``dims`` (e.g. ``layer 3, expert 7``) and what is wrong with it (vectorised)."""
    a = np.asarray(count)
    if a.dtype.kind not in "fiu" or a.ndim != len(dims):
        raise TraceError(f"{where}: expected numbers of shape [{', '.join(dims)}], got {a.dtype} {list(a.shape)}")
    bad = ~(np.isfinite(a) & (a >= 0) & (a == np.round(a)) & (a < 2.0**62)) if a.dtype.kind == "f" else a < 0
    if bad.any():
        pos = np.unravel_index(int(np.argmax(bad)), a.shape)
        v = a[pos].item()
        big = abs(v) >= 2.0**62
        what = "NaN" if v != v else "negative" if v < 0 else "infinite or too large" if big else "fractional"
        at = ", ".join(f"{d} {int(i)}" for d, i in zip(dims, pos, strict=True))
        raise TraceError(f"{where}: count {v} at {at} is {what}; counts must be whole numbers >= 0")
    return a.astype(np.int64)


def split_by_prompt(seq_ids_T: np.ndarray, train_fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """Boolean mask [T]: True for tokens of the training prompts.

    Prompts (distinct seq ids) are shuffled with ``seed`` and the first ``train_fraction`` of them are training
    prompts, so the held-out side contains only unseen prompts.
    """
    if not 0.0 < train_fraction < 1.0:
        raise TraceError(f"train_fraction={train_fraction}: must be in (0, 1)")
    uniq = np.unique(seq_ids_T)
    if uniq.size < 2:
        raise TraceError("cannot split a trace with a single prompt into train and held-out prompts")
    rng = np.random.default_rng(seed)
    order = rng.permutation(uniq)
    n_train = min(max(1, round(train_fraction * uniq.size)), uniq.size - 1)
    return np.isin(seq_ids_T, order[:n_train])
