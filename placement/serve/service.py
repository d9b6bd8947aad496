"""The re-planning service without its HTTP shell: routing in, decayed window, decisions, plan versions.

``ReplanService`` owns one STATE_DIR (placement/serve/state.py). Its watcher thread ingests new shards of the
watched dataset (in process, or with ``ray`` as Ray tasks: ray_jobs/ingest.py, the same counts in the same
order), and every ``interval`` seconds (when traffic arrived since the last decision) asks the policy
``placement.replan.decide`` whether to re-plan. ``decide_now`` (``POST /v1/replan``) asks it at once. Each
decision first scores the previous one's forecasts on the traffic that came since (``Calibration``: how much
more optimistic the forecast was about the deployed plan than about EPLB's; ``forecast_gap`` in the status),
checkpointed with the window. With a half-life the service keeps two memories of the traffic, the window and a
long one (all traffic so far), and each decision plans on the one whose probe (EPLB's plan fitted
on it at the last decision) served the traffic since better (placement/replan/memory.py; ``memory_scores``). A
decision is a local step from the deployed plan (placement/replan/step.py; ``--method target``: the affinity
target mixed in, at a robustness kappa set by how much better balanced the deployed plan was than EPLB's probe);
the status reports the measured ``balance_slack`` and the ``kappa`` the next decision plans at.

Every change of the counts is checkpointed together with the ledger that says what they contain, so a shard or
an observation with an idempotency key is counted exactly once across restarts. Decisions and rollbacks are
serialised (one at a time) without blocking ingestion; the current plan only changes after its version file is
written and checkpointed.

Dimension key: L MoE layers, E experts.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from placement.metrics import colocation, imbalance
from placement.plan import Plan
from placement.replan.memory import LONG_HALF_LIFE, MemoryChoice, decide_on_memories
from placement.replan.moves import MoveList, move_list
from placement.replan.policy import DECIDE_METHODS, Calibration
from placement.replan.solve import warm_up
from placement.serve.ingest import Watcher, observation_counts, pending_shards, shard_counts
from placement.serve.state import Ledger, PlanVersion, StateError, StateStore
from placement.serve.window import Counts, DecayedWindow, ObservationError
from placement.trace.schema import TraceError, TraceMeta

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ray_jobs.ingest import ShardCounter

log = logging.getLogger("moeplace.serve")


@dataclass(frozen=True)
class ServiceConfig:
    """Options of ``moeplace serve`` (docs/service.md)."""

    state_dir: Path
    watch_dir: Path | None = None
    half_life: float = 0.0
    max_moves: int | None = None
    expert_bytes: int = 0
    interval: float = 0.0
    poll: float = 1.0
    time_limit: float = 10.0
    seed: int = 0
    long_half_life: float = LONG_HALF_LIFE  # the second memory (placement/replan/memory.py); 0: all traffic so far
    one_memory: bool = False  # plan on the decayed window alone
    ray: bool = False
    ray_address: str | None = None
    ray_cpus: int = 2
    ray_workers: int = 2
    warm_up: bool = False  # one tiny decision at start (placement.replan.warm_up); `moeplace serve` sets it
    method: str = "step"  # how decisions re-plan (placement.replan.policy.DECIDE_METHODS)

    def __post_init__(self) -> None:
        """The method and the memories' options (``moeplace serve`` builds the config before it touches ``--state``)."""
        if self.method not in DECIDE_METHODS:
            raise ObservationError(f"--method {self.method}: choose one of {', '.join(DECIDE_METHODS)}")
        if self.one_memory and self.long_half_life:
            raise ObservationError("--one-memory plans on the --half-life window alone; drop --long-half-life")
        if self.half_life > 0 and 0 < self.long_half_life <= self.half_life:
            raise ObservationError(
                f"--long-half-life {self.long_half_life:g}: must be 0 (all traffic so far) or longer than "
                f"--half-life {self.half_life:g}"
            )


class ReplanService:
    """Routing in, plan versions out; thread-safe. ``start`` before use, ``stop`` to flush and release."""

    def __init__(self, initial: Plan, config: ServiceConfig) -> None:
        self.config = config
        self.store = StateStore(config.state_dir)
        self.initial = initial
        self.meta = TraceMeta(initial.model_name or "unnamed", initial.num_experts, 1, initial.layers, "moeplace serve")
        self.window = DecayedWindow(self.meta, config.half_life)
        # the long memory (placement/replan/memory.py); none without decay (it would equal the window) or asked not to
        keep_long = config.half_life > 0 and not config.one_memory
        long = DecayedWindow(self.meta, config.long_half_life) if keep_long else None
        self.long_window = long
        self.ledger = Ledger()
        self.calib = Calibration()
        self.memory = MemoryChoice()
        self.current: PlanVersion | None = None
        self._lock = threading.RLock()  # window, ledger, current
        self._decide_lock = threading.Lock()  # one decision or rollback at a time
        self._live: dict[str, float] | None = None
        self._tokens_at_decision = 0
        self._last_decision = time.monotonic()
        self._watcher: Watcher | None = None
        self._ray: ShardCounter | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self, watch: bool = True) -> None:
        """Take the STATE_DIR, restore its state (or write version 1 = the initial plan), start the watcher."""
        self.store.open()
        try:
            self._restore()
            if self.config.warm_up:
                warm_up()
            if self.config.ray:
                from ray_jobs.ingest import ShardCounter

                cfg = self.config
                self._ray = ShardCounter(cfg.ray_address, cfg.ray_cpus, cfg.ray_workers)
                log.info("counting watched shards as Ray tasks on %s", self._ray.open())
        except BaseException:
            self.store.close()
            raise
        if watch and (self.config.watch_dir is not None or self.config.interval > 0):
            self._watcher = Watcher(self.step, self.config.poll)
            self._watcher.start()

    def stop(self) -> None:
        """Stop the watcher (after the shard in progress), write the checkpoint, release the STATE_DIR; idempotent."""
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        if self._ray is not None:
            self._ray.close()
            self._ray = None
        if self.current is None:
            return  # not started, or stopped already
        with self._lock:
            self._checkpoint()
            self.current = None
        self.store.close()
        log.info("stopped; state written to %s", self.store.root)

    def _restore(self) -> None:
        saved = self.store.load_checkpoint()
        versions = self.store.versions()
        if saved is None:
            if versions:
                raise StateError(f"{self.store.root}: plan versions but no checkpoint; use an empty --state directory")
            v1 = PlanVersion(1, self.initial, "initial plan", _empty_moves(self.initial), created=time.time())
            self.store.write_version(v1)
            self.ledger.plan_version = 1
            self.current = v1
            self._checkpoint()
            return
        arrays, self.ledger = saved
        self.window.restore(arrays, where=str(self.store.root))
        if self.long_window is not None:  # a checkpoint without it (written before it was kept): the window's
            long = {k[5:]: v for k, v in arrays.items() if k.startswith("long_")} or arrays
            self.long_window.restore(long, where=str(self.store.root))
        self.calib = Calibration.from_arrays(arrays)
        self.memory = MemoryChoice.from_arrays(arrays)
        for v in versions:
            if v > self.ledger.plan_version:  # written, then the service stopped before it was recorded
                path = self.store.version_path(v)
                path.rename(path.with_suffix(".orphan"))
                log.warning("%s: version never recorded in the checkpoint; set aside as .orphan", path)
        self.current = self.store.read_version(self.ledger.plan_version)
        self._learn_top_k(self.ledger.top_k)
        if not _same_placement(self.store.read_version(1).plan, self.initial):
            log.warning("--plan differs from version 1 of %s; the state's plan history is kept", self.store.root)
        self._tokens_at_decision = self.window.observed_tokens

    def _learn_top_k(self, top_k: int | None) -> None:
        """The window's metadata takes the model's top-k from the first routing that has one."""
        if top_k and 0 < top_k <= self.meta.num_experts:
            self.ledger.top_k = top_k
            self.meta = replace(self.meta, top_k=top_k)
            self.window.meta = self.meta
            if self.long_window is not None:
                self.long_window.meta = self.meta

    def _checkpoint(self) -> None:
        arrays = {**self.window.arrays(), **self.calib.arrays(), **self.memory.arrays()}
        if self.long_window is not None:
            arrays |= {f"long_{k}": v for k, v in self.long_window.arrays().items()}
        self.store.save_checkpoint(arrays, self.ledger)

    # ------------------------------------------------------------------ ingestion
    def step(self) -> None:
        """One watcher step: ingest new shards, then decide if the interval has passed since the last decision."""
        self.ingest_pending()
        cfg = self.config
        due = cfg.interval > 0 and time.monotonic() - self._last_decision >= cfg.interval
        if due and self.window.observed_tokens > self._tokens_at_decision:
            self.decide_now("interval")

    def ingest_pending(self) -> int:
        """Ingest every shard of the watched dataset not in the ledger; returns how many were counted."""
        if self.config.watch_dir is None:
            return 0
        with self._lock:
            done = set(self.ledger.shards) | set(self.ledger.quarantined)
        n = 0
        for path, got in self._counted(pending_shards(self.config.watch_dir, done)):
            try:
                if isinstance(got, Exception):
                    raise got
                counts, top_k = got
                self.window.check(counts, path.name)
            except (TraceError, ValueError) as exc:
                with self._lock:
                    self.ledger.quarantined[path.name] = str(exc)
                    self._checkpoint()
                log.warning("quarantined %s: %s", path, exc)
                continue
            with self._lock:
                self.ledger.shards[path.name] = counts.num_tokens
                self._add(counts, top_k)
            n += 1
        return n

    def _counted(self, paths: list[Path]) -> Iterator[tuple[Path, Any]]:
        """``(path, (counts, top-k) or the shard's TraceError / ValueError)`` per shard, in the order of ``paths``:
        counted in process, or as Ray tasks with ``ray`` (the same function, so the same counts and errors)."""
        errors = (TraceError, ValueError)
        if self._ray is not None:
            yield from self._ray.counted(shard_counts, paths, self.current_plan, errors=errors)
            return
        for path in paths:
            try:
                yield path, shard_counts(path, self.current_plan)
            except errors as exc:
                yield path, exc

    def observe(self, body: bytes, content_type: str, key: str | None) -> dict[str, Any]:
        """Count a posted observation (``key``: idempotency key, counted at most once); ObservationError or
        TraceError when the body is not one, with nothing changed."""
        with self._lock:
            if key is not None and key in self.ledger.keys:
                return {"duplicate": True, "tokens": self.ledger.keys[key], **self._status()}
            batch = self.ledger.batches
        plan, incoming = self.current_plan, self.store.root / "incoming"
        counts, top_k = observation_counts(body, content_type, plan, batch, incoming, self.ledger.top_k)
        self.window.check(counts, "body")
        with self._lock:
            if key is not None:
                if key in self.ledger.keys:
                    return {"duplicate": True, "tokens": self.ledger.keys[key], **self._status()}
                self.ledger.keys[key] = counts.num_tokens
            self._add(counts, top_k)
            return {"duplicate": False, "tokens": counts.num_tokens, **self._status()}

    def _add(self, counts: Counts, top_k: int | None) -> None:
        self.window.add(counts)
        if self.long_window is not None:
            self.long_window.add(counts)
        self.ledger.batches += 1
        if not self.ledger.top_k:
            self._learn_top_k(top_k)
        self._live = None
        self._checkpoint()

    # ------------------------------------------------------------------ decisions
    @property
    def current_plan(self) -> Plan:
        if self.current is None:
            raise StateError("the service is not started; call start() first")
        return self.current.plan

    def decide_now(self, trigger: str = "request") -> dict[str, Any]:
        """Ask the policy now; a new version when it re-plans. Returns version, changed, reason and metrics."""
        with self._decide_lock:
            with self._lock:
                current = self.current_plan
                graphs = [w.graph() for w in (self.window, self.long_window) if w is not None]
                tokens = self.window.observed_tokens
                fresh_LE = self.window.take_fresh()
                if self.long_window is not None:
                    self.long_window.take_fresh()
            self._last_decision = time.monotonic()
            if tokens == 0:
                return self._decided(False, "no traffic observed yet", 0, 0, {}, {})
            t0 = time.perf_counter()
            cfg = self.config
            calib = self.calib.scored(current, fresh_LE)  # the last decision's forecasts on the traffic since
            res, memory = decide_on_memories(current, graphs, self.memory, fresh_LE, budget=cfg.max_moves,
                                             expert_bytes=cfg.expert_bytes, time_limit=cfg.time_limit,
                                             method=cfg.method)  # fmt: skip
            wall = time.perf_counter() - t0
            reason = f"{trigger}: {res.reason}"
            after = {**res.after, "decision_seconds": round(wall, 3)}
            with self._lock:
                self._tokens_at_decision = tokens
                self.calib = calib.after(res)
                self.memory = memory
                self.ledger.decisions += 1
                if res.changed:
                    self._append_version(res.plan, res.moves, reason, res.before, after)
                else:
                    self._checkpoint()
                log.info("decision (%s): changed=%s, %s", trigger, res.changed, res.reason)
                return self._decided(
                    res.changed, reason, len(res.moves.moves), res.moves.total_bytes, res.before, after
                )

    def rollback(self, version: int) -> dict[str, Any]:
        """Append a version whose plan is version ``version``'s (StateError if it does not exist)."""
        with self._decide_lock:
            target = self.store.read_version(version)
            with self._lock:
                moves = move_list(self.current_plan, target.plan, self.config.expert_bytes)
                reason = f"rollback to version {version}"
                self.calib = Calibration(self.calib.gaps_N)  # the pending forecasts were of another plan
                self._append_version(target.plan, moves, reason, {}, {})
                return self._decided(True, reason, len(moves.moves), moves.total_bytes, {}, {})

    def _append_version(
        self, plan: Plan, moves: MoveList, reason: str, before: dict[str, Any], after: dict[str, Any]
    ) -> None:
        """Write the version file, then checkpoint the ledger that makes it current (caller holds the lock)."""
        n = self.ledger.plan_version + 1
        v = PlanVersion(n, plan, reason, moves.to_dict(), before, after, self.window.observed_tokens, time.time())
        self.store.write_version(v)
        self.ledger.plan_version = n
        self.ledger.changes += 1
        self.ledger.moves += len(moves.moves)
        self.ledger.bytes_moved += moves.total_bytes
        self._checkpoint()
        self.current = v
        self._live = None

    def _decided(
        self, changed: bool, reason: str, moves: int, nbytes: int, before: dict[str, Any], after: dict[str, Any]
    ) -> dict[str, Any]:
        return {
            "version": self.ledger.plan_version,
            "changed": changed,
            "reason": reason,
            "moves": moves,
            "bytes": nbytes,
            "before": before,
            "after": after,
        }

    # ------------------------------------------------------------------ reading
    def live(self) -> dict[str, float]:
        """Colocation and imbalance (../shared/METRICS.md) of the current plan on the decayed window."""
        with self._lock:
            if self._live is None:
                g = self.window.graph()
                _, imb_max, imb_mean = imbalance(self.current_plan, g)
                self._live = {
                    "colocation": colocation(self.current_plan, g),
                    "imbalance_max": imb_max,
                    "imbalance_mean": imb_mean,
                }
            return dict(self._live)

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {**self._status(), "live": self.live()}

    def _status(self) -> dict[str, Any]:
        led = self.ledger
        return {
            "observed_tokens": self.window.observed_tokens,
            "plan_version": led.plan_version,
            "window_tokens": round(self.window.weight, 1),
            "half_life": self.window.half_life,
            "shards_ingested": len(led.shards),
            "shards_quarantined": len(led.quarantined),
            "decisions": led.decisions,
            "changes": led.changes,
            "moves_total": led.moves,
            "bytes_moved_total": led.bytes_moved,
            "forecast_gap": self.calib.recent_gap(),
            "memory_half_lives": [w.half_life for w in (self.window, self.long_window) if w is not None],
            "memory_scores": self.memory.recent(),
            "balance_slack": self.memory.slack(),
            "kappa": self.memory.planned_kappa(self.current_plan, self.config.method),
        }

    def counters(self) -> Ledger:
        with self._lock:
            return replace(self.ledger)

    def version(self, version: int | None = None) -> PlanVersion:
        """A plan version (the current one by default); StateError if it does not exist."""
        with self._lock:
            if version is None or (self.current is not None and version == self.current.version):
                if self.current is None:
                    raise StateError("the service is not started; call start() first")
                return self.current
        return self.store.read_version(version)


def _empty_moves(plan: Plan) -> dict[str, Any]:
    return MoveList(plan.model_name, plan.num_gpus, 0, (), plan.layers).to_dict()


def _same_placement(a: Plan, b: Plan) -> bool:
    return a.phy2log.shape == b.phy2log.shape and bool((a.phy2log == b.phy2log).all())
