"""Loads-only traces: per-layer expert selection counts without per-token routing.

Some sources record only how often each expert was chosen (SGLang ``stat`` dumps, fiddler-style popularity
JSON). They cannot give transitions or co-activation, so moeplace keeps them apart from token traces as a
``LoadTrace`` saved as JSON (``moeplace import --loads-only``) that ``moeplace stats`` reads.

Files read here:

- moeplace loads JSON: ``{"kind": "moeplace.loads", "schema_version": 1, "model_name", "num_experts",
  "layers", "num_tokens", "load_LE", "source"}``.
- popularity JSON (efeslab/fiddler): ``{"total_input_tokens": n, "expert_popularity": [[count] * E] * L}``.

Dimension key: L MoE layers, E experts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from placement.trace.schema import TraceError, check_counts

LOADS_KIND = "moeplace.loads"
LOADS_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class LoadTrace:
    """Per-layer expert loads of a model. load_LE int64 [L, E]: times expert e was chosen at MoE layer l."""

    model_name: str
    layers: tuple[int, ...]
    load_LE: np.ndarray
    num_tokens: int | None = None
    source: str = ""

    def __post_init__(self) -> None:
        load = np.asarray(self.load_LE)
        if load.ndim != 2 or load.shape[0] != len(self.layers) or load.shape[1] < 1:
            raise TraceError(f"load_LE must have shape [L={len(self.layers)}, E], got {list(load.shape)}")
        object.__setattr__(self, "load_LE", check_counts(load, "load_LE", ("layer", "expert")))
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))

    @property
    def num_experts(self) -> int:
        return int(self.load_LE.shape[1])

    def to_json(self) -> str:
        return json.dumps(
            {
                "kind": LOADS_KIND,
                "schema_version": LOADS_SCHEMA_VERSION,
                "model_name": self.model_name,
                "num_experts": self.num_experts,
                "layers": list(self.layers),
                "num_tokens": self.num_tokens,
                "source": self.source,
                "load_LE": self.load_LE.tolist(),
            }
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        from placement.trace.dataset import atomic_write_bytes

        atomic_write_bytes(Path(path), self.to_json().encode())


def is_loads_file(spec: str | os.PathLike[str]) -> bool:
    """True for a path moeplace treats as a loads-only trace (a .json file)."""
    return str(spec).endswith(".json") and Path(spec).is_file()


def read_loads(path: str | os.PathLike[str], *, model_name: str | None = None) -> LoadTrace:
    """Read a moeplace loads JSON or a fiddler popularity JSON."""
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TraceError(f"{p}: not a readable JSON file ({exc})") from exc
    if not isinstance(d, dict):
        raise TraceError(f"{p}: expected a JSON object of expert loads, got {type(d).__name__}")
    try:
        if d.get("kind") == LOADS_KIND:
            if d.get("schema_version") != LOADS_SCHEMA_VERSION:
                raise TraceError(
                    f"{p}: loads schema version {d.get('schema_version')}, this moeplace reads "
                    f"{LOADS_SCHEMA_VERSION}; re-import the source"
                )
            n = d.get("num_tokens")
            return LoadTrace(
                model_name or str(d["model_name"]),
                tuple(d["layers"]),
                _numbers(d["load_LE"]),
                None if n is None else int(n),
                str(d.get("source", "")),
            )
        if "expert_popularity" in d:
            load = _numbers(d["expert_popularity"])
            n_tok = d.get("total_input_tokens")
            return LoadTrace(
                model_name or p.stem,
                tuple(range(load.shape[0] if load.ndim == 2 else 0)),
                load,
                None if n_tok is None else int(n_tok),
                "popularity",
            )
    except TraceError as exc:
        raise TraceError(f"{p}: {exc}") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise TraceError(f"{p}: malformed loads file ({exc!r})") from exc
    keys = ", ".join(sorted(map(str, d))) or "none"
    raise TraceError(
        f"{p}: unknown JSON (keys: {keys}); expected moeplace loads JSON or {{'expert_popularity': [[...]]}}"
    )


def _numbers(obj: object) -> np.ndarray:
    """A JSON array of numbers as a numpy array, without casting (NaN, 1.5 and -1 are refused by check_counts)."""
    a = np.asarray(obj)
    if a.dtype.kind not in "fiu":
        raise TraceError(f"expected an array of numbers, got {a.dtype} values")
    return a


def count_loads(ids_TLK: np.ndarray, num_experts: int) -> np.ndarray:
    """int64 [L, E]: tokens routed to each expert per layer, as ../shared/METRICS.md counts them (a negative id
    is skipped, a repeated id of one token counts once). Vectorised over all tokens and layers."""
    L = ids_TLK.shape[1]
    s_TLK = np.sort(ids_TLK.astype(np.int64), axis=2)
    keep_TLK = s_TLK >= 0
    keep_TLK[:, :, 1:] &= s_TLK[:, :, 1:] != s_TLK[:, :, :-1]
    flat = (np.arange(L, dtype=np.int64)[None, :, None] * num_experts + s_TLK)[keep_TLK]
    return np.bincount(flat, minlength=L * num_experts).reshape(L, num_experts)
