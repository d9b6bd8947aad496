"""Re-planning through the real service: `moeplace serve` in a subprocess, driven over its HTTP API.

    python benchmarks/bench_replan_service.py [--quick] [--stream NAME ...] [--half-life TOKENS ...] [--json OUT]

A prompt-ordered stream is cut into windows. Window 0 fits the initial plan (the service's version 1). Then for
each window i: its tokens are written into the watched dataset as one shard (as `moeplace import` or a Ray job
would), the script waits until GET /v1/status shows them in `observed_tokens`, POSTs /v1/replan (timed: the
decision time), GETs /v1/plan, and scores that plan on window i+1 (no peeking): imbalance_max and colocation of
../shared/METRICS.md, moves (from the decision's move list) and bytes moved.

Streams (../shared/traces is read in place):
- ds-v2-lite: DeepSeek-V2-Lite-Chat dev prompts in their order, windows of 125 prompts, G = 8;
- mixtral: Mixtral-8x7B prefill -> decode (two windows), G = 4;
- shift: synthetic 26 x 64 top-6 stream whose topic mix changes halfway, windows of 125 prompts, G = 8.

Dimension key: T tokens, L MoE layers, E experts.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from placement.graph import graph_from_routes
from placement.metrics import colocation, imbalance
from placement.plan import Plan
from placement.trace.dataset import TraceWriter
from placement.trace.schema import RouteArrays, TraceMeta

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "traces"
TOKEN = "bench-token"


def prompt_windows(routes: RouteArrays, prompts_per_window: int) -> list[RouteArrays]:
    """Consecutive windows of whole prompts, in the order prompts first appear in the trace."""
    _, first = np.unique(routes.seq_ids_T, return_index=True)
    order = routes.seq_ids_T[np.sort(first)]
    rank = {int(s): i for i, s in enumerate(order)}
    win_T = np.array([rank[int(s)] for s in routes.seq_ids_T]) // prompts_per_window
    return [routes.take(win_T == w) for w in range(int(win_T.max()) + 1)]


def score(plan: Plan, meta: TraceMeta, window: RouteArrays) -> dict[str, float]:
    g = graph_from_routes(window.expert_ids_TLK, meta, with_coact=False)
    return {"imbalance_max": imbalance(plan, g)[1], "colocation": colocation(plan, g)}


class Service:
    """`python -m placement serve` on a free 127.0.0.1 port, stopped with SIGTERM."""

    def __init__(self, plan: Path, state: Path, watch: Path, *extra: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "placement", "serve", "--plan", str(plan), "--state", str(state)]
        cmd += ["--watch", str(watch), "--port", str(port), "--token", TOKEN, "--interval", "0", "--poll", "0.05"]
        cmd += ["--log-level", "warning", *extra]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ))
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moeplace serve exited with {self.proc.returncode}")
            try:
                if self.http.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("moeplace serve did not come up in 120 s")

    def wait_tokens(self, n: int, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while self.http.get("/v1/status").json()["observed_tokens"] < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"observed_tokens never reached {n}")
            time.sleep(0.05)

    def replan(self) -> tuple[dict[str, Any], float]:
        t0 = time.perf_counter()
        r = self.http.post("/v1/replan", headers={"Authorization": f"Bearer {TOKEN}"})
        r.raise_for_status()
        out: dict[str, Any] = r.json()
        return out, time.perf_counter() - t0

    def plan(self) -> Plan:
        return Plan.from_json(self.http.get("/v1/plan").content)

    def stop(self) -> None:
        self.http.close()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)


def service_replay(
    meta: TraceMeta,
    windows: list[RouteArrays],
    initial: Plan,
    *,
    half_life: float,
    expert_bytes: int = 0,
    max_moves: int | None = None,
    time_limit: float = 10.0,
) -> list[dict[str, Any]]:
    """Per window i >= 1 (the decision after seeing windows 0..i-1... see module docstring): the service's plan
    after window i scored on window i+1. Window 0 is what the initial plan was fitted on: it is ingested first."""
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        root = Path(tmp)
        initial.save(root / "plan.json")
        extra = ["--half-life", str(half_life), "--expert-bytes", str(expert_bytes), "--time-limit", str(time_limit)]
        extra += [] if max_moves is None else ["--max-moves", str(max_moves)]
        svc = Service(root / "plan.json", root / "state", root / "ds", *extra)
        try:
            seen = 0
            for i, w in enumerate(windows[:-1]):
                with TraceWriter(root / "ds", meta, writer_id=f"win{i:03d}") as wr:
                    wr.write(w.expert_ids_TLK, w.seq_ids_T, w.token_pos_T)
                seen += w.num_tokens
                svc.wait_tokens(seen)
                if i == 0:
                    continue  # the initial plan was fitted on window 0
                res, wall = svc.replan()
                plan = svc.plan()
                rows.append(
                    {
                        "window": i,
                        **score(plan, meta, windows[i + 1]),
                        "moves": res["moves"],
                        "bytes": res["bytes"],
                        "changed": res["changed"],
                        "decision_s": round(wall, 3),
                        "version": res["version"],
                    }
                )
        finally:
            svc.stop()
    return rows


def eplb_replay(meta: TraceMeta, windows: list[RouteArrays], initial: Plan, last: int | None) -> list[dict[str, Any]]:
    """Periodic EPLB recompute on all traffic so far (``last`` None) or the last ``last`` windows, GPUs relabelled
    per layer to minimise moves (its best case); same rows as ``service_replay``."""
    from placement.replan.moves import count_moves, relabel_gpus
    from placement.solvers.baselines import eplb_phy2log

    rows, plan = [], initial
    load_WLE = [graph_from_routes(w.expert_ids_TLK, meta, with_coact=False).load_LE for w in windows]
    for i in range(1, len(windows) - 1):
        t0 = time.perf_counter()
        load_LE = np.sum(load_WLE[: i + 1] if last is None else load_WLE[max(0, i + 1 - last) : i + 1], axis=0)
        fresh = Plan(plan.num_gpus, plan.num_nodes, plan.num_experts, plan.layers,
                     eplb_phy2log(load_LE, plan.num_slots, plan.num_gpus, plan.num_nodes))  # fmt: skip
        new = relabel_gpus(plan, fresh, per_layer=True)
        moves = count_moves(plan, new)
        wall = time.perf_counter() - t0
        plan = new
        rows.append({"window": i, **score(plan, meta, windows[i + 1]), "moves": moves, "decision_s": round(wall, 3)})
    return rows


def static_replay(meta: TraceMeta, windows: list[RouteArrays], initial: Plan) -> list[dict[str, Any]]:
    return [{"window": i, **score(initial, meta, windows[i + 1]), "moves": 0, "decision_s": 0.0}
            for i in range(1, len(windows) - 1)]  # fmt: skip


def load_stream(name: str) -> tuple[TraceMeta, list[RouteArrays], int]:
    """(meta, windows, G) of a stream of the module docstring."""
    from placement.trace.dataset import open_trace

    if name == "ds-v2-lite":
        tr = open_trace(SHARED / "deepseek-v2-lite-chat.dev.npz")
        return tr.meta, prompt_windows(tr.read_all(with_gates=False), 125), 8
    if name == "mixtral":
        pre = open_trace(str(SHARED / "mixtral-8x7b-instruct.humaneval0.npz") + ":prefill")
        dec = open_trace(str(SHARED / "mixtral-8x7b-instruct.humaneval0.npz") + ":decode")
        return pre.meta, [pre.read_all(with_gates=False), dec.read_all(with_gates=False)], 4
    raise SystemExit(f"unknown stream {name!r}")


def summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    return {
        "imbalance_max": float(np.mean([r["imbalance_max"] for r in rows])),
        "colocation": float(np.mean([r["colocation"] for r in rows])),
        "moves": float(sum(r["moves"] for r in rows)),
        "decision_s": float(np.mean([r["decision_s"] for r in rows])),
    }


def main(argv: list[str] | None = None) -> None:
    from placement.planner import make_plan
    from placement.solvers.base import PlanSpec

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stream", nargs="+", default=["ds-v2-lite"], help="ds-v2-lite, mixtral")
    ap.add_argument("--half-life", type=float, nargs="*", default=[0.0], help="service --half-life values")
    ap.add_argument("--max-moves", type=int, default=None, help="service --max-moves")
    ap.add_argument("--time-limit", type=float, default=10.0, help="solver seconds (initial plan and decisions)")
    ap.add_argument("--json", type=Path, help="write every row as JSON")
    args = ap.parse_args(argv)
    out: dict[str, Any] = {}
    for name in args.stream:
        meta, windows, G = load_stream(name)
        w0 = windows[0]
        g0 = graph_from_routes(w0.expert_ids_TLK, meta, with_coact=False, seq_ids_T=w0.seq_ids_T)
        initial = make_plan(g0, PlanSpec(G, time_limit=args.time_limit, auto_balance=True), "auto")
        policies = {
            "static": static_replay(meta, windows, initial),
            "eplb all": eplb_replay(meta, windows, initial, None),
            "eplb last 2": eplb_replay(meta, windows, initial, 2),
        }
        for hl in args.half_life:
            policies[f"service hl={hl:g}"] = service_replay(
                meta, windows, initial, half_life=hl, max_moves=args.max_moves, time_limit=args.time_limit
            )
        out[name] = policies
        print(f"\n{name}: {len(windows)} windows, G = {G}; each plan scored on the next window")
        print(f"{'policy':<22}{'imbalance_max':>14}{'colocation':>12}{'moves':>8}{'decision s':>12}")
        for pol, rows in policies.items():
            sm = summary(rows)
            print(f"{pol:<22}{sm['imbalance_max']:>14.3f}{sm['colocation']:>12.3f}{sm['moves']:>8.0f}"
                  f"{sm['decision_s']:>12.2f}")  # fmt: skip
        for pol, rows in policies.items():
            per = " ".join(f"{r['imbalance_max']:.3f}/{r['colocation']:.3f}/{r['moves']}" for r in rows)
            print(f"  {pol}: {per}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
