"""What the service keeps in its STATE_DIR, written atomically (temp file + rename) so a crash leaves either the
old or the new file, never half of one.

- ``versions/v{n:06d}.json``: plan version n (``PlanVersion``: the plan, its move list from version n-1, the
  reason it was made, the metrics before and after). Versions are append-only; a rollback appends a new one.
- ``checkpoint.npz``: the decayed routing window (placement/serve/window.py) and, in the same file, the
  ``Ledger`` (shards ingested or quarantined, idempotency keys of posted observations, decision counters), so the
  counts and the record of what they contain change together: a shard is counted exactly once across restarts.
- ``.lock``: held (flock) while a service runs, so two services never share one STATE_DIR.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from placement.plan import Plan, PlanError, json_default
from placement.trace.dataset import atomic_write_bytes

STATE_SCHEMA_VERSION = 1
CHECKPOINT = "checkpoint.npz"
VERSIONS_DIR = "versions"
LOCK_FILE = ".lock"


class StateError(ValueError):
    """A STATE_DIR this service cannot use; the message is one line naming the file and how to fix it."""


@dataclass(frozen=True)
class PlanVersion:
    """Plan version ``version``: ``moves`` is the move list from the previous version (MoveList.to_json's
    object), ``reason`` why it was made, ``before`` / ``after`` the decision's metrics."""

    version: int
    plan: Plan
    reason: str
    moves: dict[str, Any] = field(default_factory=dict)
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    observed_tokens: int = 0
    created: float = 0.0
    schema_version: int = STATE_SCHEMA_VERSION

    def to_json(self) -> str:
        d = {
            "schema_version": self.schema_version,
            "version": self.version,
            "created": self.created,
            "observed_tokens": self.observed_tokens,
            "reason": self.reason,
            "before": self.before,
            "after": self.after,
            "moves": self.moves,
            "plan": self.plan.to_dict(),
        }
        return json.dumps(d, separators=(",", ":"), default=json_default)

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> PlanVersion:
        try:
            d = json.loads(text)
            if d.get("schema_version") != STATE_SCHEMA_VERSION:
                raise StateError(f"{where}: schema version {d.get('schema_version')}, expected {STATE_SCHEMA_VERSION}")
            plan = Plan.from_json(json.dumps(d["plan"]), where=f"{where} plan")
            return cls(
                int(d["version"]),
                plan,
                str(d["reason"]),
                dict(d["moves"]),
                dict(d["before"]),
                dict(d["after"]),
                int(d["observed_tokens"]),
                float(d["created"]),
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, StateError | PlanError):
                raise StateError(str(exc)) from None
            raise StateError(f"{where}: damaged plan version ({exc!r}); restore it from a backup") from exc


@dataclass
class Ledger:
    """What the window's counts contain, and the decision counters, persisted with the counts.

    ``shards``: shard file name -> tokens counted; ``quarantined``: shard file name -> reason it was refused;
    ``keys``: idempotency key of a posted observation -> tokens counted; ``top_k``: the model's, once seen."""

    shards: dict[str, int] = field(default_factory=dict)
    quarantined: dict[str, str] = field(default_factory=dict)
    keys: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    decisions: int = 0
    changes: int = 0
    moves: int = 0
    bytes_moved: int = 0
    plan_version: int = 0
    top_k: int = 0

    def to_json(self) -> str:
        return json.dumps({"schema_version": STATE_SCHEMA_VERSION, **self.__dict__}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> Ledger:
        try:
            d = json.loads(text)
            if d.pop("schema_version", None) != STATE_SCHEMA_VERSION:
                raise StateError(f"{where}: ledger schema version differs from {STATE_SCHEMA_VERSION}")
            return cls(**d)
        except (json.JSONDecodeError, TypeError) as exc:
            raise StateError(f"{where}: damaged ledger ({exc}); restore the STATE_DIR from a backup") from exc


class StateStore:
    """The files of one STATE_DIR. ``open`` takes the lock; ``close`` releases it."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._lock: IO[bytes] | None = None

    def open(self) -> None:
        (self.root / VERSIONS_DIR).mkdir(parents=True, exist_ok=True)
        fh = open(self.root / LOCK_FILE, "ab")  # held until close()
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            raise StateError(f"{self.root}: another moeplace serve uses this --state; stop it first") from None
        self._lock = fh

    def close(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    # ------------------------------------------------------------------ plan versions
    def version_path(self, version: int) -> Path:
        return self.root / VERSIONS_DIR / f"v{version:06d}.json"

    def versions(self) -> list[int]:
        return sorted(int(p.stem[1:]) for p in (self.root / VERSIONS_DIR).glob("v[0-9]*.json"))

    def write_version(self, v: PlanVersion) -> None:
        if self.version_path(v.version).exists():
            raise StateError(f"{self.version_path(v.version)}: version {v.version} exists; versions are append-only")
        atomic_write_bytes(self.version_path(v.version), v.to_json().encode())

    def read_version(self, version: int) -> PlanVersion:
        path = self.version_path(version)
        if not path.is_file():
            raise StateError(f"plan version {version} does not exist; versions are {self._range()}")
        return PlanVersion.from_json(path.read_bytes(), where=str(path))

    def _range(self) -> str:
        vs = self.versions()
        return f"{vs[0]}..{vs[-1]}" if vs else "none yet"

    # ------------------------------------------------------------------ checkpoint
    def save_checkpoint(self, arrays: dict[str, np.ndarray], ledger: Ledger) -> None:
        """Counts and ledger in one file, replaced atomically."""
        buf = io.BytesIO()
        ledger_U8 = np.frombuffer(ledger.to_json().encode(), dtype=np.uint8)
        payload: dict[str, Any] = {**arrays, "ledger": ledger_U8, "saved": np.array([time.time()])}
        np.savez(buf, **payload)
        atomic_write_bytes(self.root / CHECKPOINT, buf.getvalue())

    def load_checkpoint(self) -> tuple[dict[str, np.ndarray], Ledger] | None:
        path = self.root / CHECKPOINT
        if not path.exists():
            return None
        try:
            with np.load(path) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError) as exc:
            raise StateError(f"{path}: unreadable checkpoint ({exc}); restore it from a backup") from exc
        ledger = Ledger.from_json(arrays.pop("ledger").tobytes().decode(), where=str(path))
        return arrays, ledger


def ensure_token(root: str | os.PathLike[str], name: str = "token") -> tuple[str, Path]:
    """The bearer token kept in ``root/name``: read it, or create a random one (readable by the owner only)."""
    import secrets

    path = Path(root) / name
    if path.is_file():
        token = path.read_text().strip()
        if token:
            return token, path
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    os.replace(path.with_suffix(".tmp"), path)
    return token, path
