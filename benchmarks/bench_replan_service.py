"""Re-planning through the real service: `moeplace serve` in a subprocess, driven over its HTTP API, as one more
policy column of benchmarks/bench_replan.py's replay (same streams, windows, initial plan and scoring).

    python benchmarks/bench_replan_service.py [--quick] [--only NAME ...] [--half-life WINDOWS ...] [--json OUT]

The service policy, after windows 0..w-1: every window not yet sent is written into the watched dataset as one
shard (as `moeplace import` or a Ray job would), the script waits until GET /v1/status shows them in
`observed_tokens`, POSTs /v1/replan (the service's default policy, placement.replan.decide, on the memory it
chooses: its decayed window or all traffic so far) and GETs /v1/plan, which bench_replan's ``replay`` scores on
window w (no peeking). The service starts from the plan the other policies start from (``moeplace plan``'s
default fitted on window 0), which serves window 1; with `--decide-after-window-0` every policy decides after
window 0 too (the bar's protocol read literally: window 0 imported and a replan before window 1). Its half-life is
given in windows and passed in tokens (mean window size); `--with` adds bench_replan's other policies for
comparison (default: static, eplb, eplb-all, eplb-last2, decide; affinity recompute is slow).
The Mixtral stream reaches the service as what it is, one prompt (one seq id: the service samples it by token
blocks); the in-process policies keep bench_replan's 8-token pseudo-prompts.

Dimension key: T tokens.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_replan import (
    EXPERT_BYTES,
    STREAMS,
    initial_plans,
    policies,
    print_stream,
    replay,
    stream_routes,
    summarise,
)

from placement.graph import PROMPT_FOLDS, RoutingGraph, graph_from_routes
from placement.plan import Plan
from placement.replan.solve import TARGET_ANNEAL_MOVES
from placement.trace.dataset import TraceWriter
from placement.trace.schema import RouteArrays, TraceMeta
from placement.trace.synthetic import synthetic_trace

REPO = Path(__file__).resolve().parents[1]
TOKEN = "bench-token"


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
            time.sleep(0.02)

    def replan(self) -> dict[str, Any]:
        r = self.http.post("/v1/replan", headers={"Authorization": f"Bearer {TOKEN}"})
        r.raise_for_status()
        out: dict[str, Any] = r.json()
        return out

    def plan(self) -> Plan:
        return Plan.from_json(self.http.get("/v1/plan").content)

    def stop(self) -> None:
        self.http.close()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)


def service_policy(
    svc: Service, meta: TraceMeta, windows: list[RouteArrays], dataset: Path, log: list[dict[str, Any]]
) -> Callable[[list[RoutingGraph], Plan], Plan]:
    """A bench_replan policy that sends the windows seen so far to the service and takes its plan."""
    sent = [0]

    def policy(history: list[RoutingGraph], current: Plan) -> Plan:
        for w in range(sent[0], len(history)):
            win = windows[w]
            with TraceWriter(dataset, meta, writer_id=f"win{w:03d}") as wr:
                wr.write(win.expert_ids_TLK, win.seq_ids_T, win.token_pos_T)
        sent[0] = len(history)
        svc.wait_tokens(sum(w.num_tokens for w in windows[: len(history)]))
        t0 = time.perf_counter()
        res = svc.replan()
        log.append({**res, "post_s": round(time.perf_counter() - t0, 3)})
        return svc.plan()

    return policy


def bench_ingest(num_tokens: int = 100_000, shards: int = 3) -> None:
    """Ingestion speed of the service (in-process): synthetic DeepSeek-V3 shape shards into the window, each
    counted (streamed graph build with prompt folds) and checkpointed with the ledger."""
    from placement.plan import gpu_of_expert_to_phy2log
    from placement.serve.service import ReplanService, ServiceConfig

    L, E, K, G = 58, 256, 8, 32
    meta, r = synthetic_trace(L, E, K, num_tokens, seed=1, model_name="dsv3-shape")
    gpu_LE = np.tile(np.arange(E) // (E // G), (L, 1))
    plan = Plan(G, 1, E, meta.layers, gpu_of_expert_to_phy2log(gpu_LE, G), model_name=meta.model_name)
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        root = Path(tmp)
        for i in range(shards):
            with TraceWriter(root / "ds", meta, writer_id=f"w{i}") as w:
                w.write(r.expert_ids_TLK, r.seq_ids_T + i * 10**6, r.token_pos_T)
        svc = ReplanService(plan, ServiceConfig(root / "state", root / "ds", half_life=50_000))
        svc.start(watch=False)
        t0 = time.perf_counter()
        svc.ingest_pending()
        wall = time.perf_counter() - t0
        t0 = time.perf_counter()
        svc.status()
        status_s = time.perf_counter() - t0
        size = (root / "state" / "checkpoint.npz").stat().st_size
        svc.stop()
    rows = shards * num_tokens * L
    print(f"ingest: {shards} shards x {num_tokens:,} tokens ({L} x {E}, top-{K}) in {wall:.2f} s: "
          f"{rows / wall / 1e6:.2f} M rows/s with a {size / 1e6:.0f} MB checkpoint per shard; "
          f"status with live metrics {status_s:.2f} s")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI size: 4 windows per stream, short time limits")
    ap.add_argument("--only", nargs="*", help=f"stream names to run ({', '.join(STREAMS)})")
    ap.add_argument("--half-life", type=float, nargs="+", default=[2.0], help="service half-life in windows")
    ap.add_argument("--max-moves", type=int, default=None, help="service --max-moves (default: the policy's)")
    ap.add_argument("--with", dest="others", nargs="*", default=["static", "eplb", "eplb-all", "eplb-last2", "decide"],
                    help="other policies")  # fmt: skip
    ap.add_argument("--time-limit", type=float, default=None, help="seconds per plan (default 10, quick 2)")
    ap.add_argument("--json", type=Path, help="write all rows as JSON")
    after0 = "every policy decides after window 0 too (default: the initial plan serves window 1)"
    ap.add_argument("--decide-after-window-0", action="store_true", help=after0)
    ap.add_argument("--ingest", action="store_true", help="measure the service's ingestion speed instead")
    args = ap.parse_args(argv)
    if args.ingest:
        bench_ingest()
        return
    tl = args.time_limit or (2.0 if args.quick else 10.0)
    everything: dict[str, Any] = {}
    for name, (meta, windows, G) in stream_routes(args.quick).items():
        if args.only and name not in args.only:
            continue
        graphs = [graph_from_routes(w.expert_ids_TLK, meta, False, w.seq_ids_T, PROMPT_FOLDS) for w in windows]
        if name == "mixtral":  # one prompt, one id
            windows = [RouteArrays(w.expert_ids_TLK, np.zeros_like(w.seq_ids_T), w.token_pos_T) for w in windows]
        init = initial_plans(graphs[0], G, tl)
        pols = {k: v for k, v in policies(tl).items() if k in args.others}
        starts = {k: init[k] for k in pols}
        logs: dict[str, list[dict[str, Any]]] = {}
        services = []
        with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
            init["decide"].save(Path(tmp) / "plan.json")
            tokens_per_window = float(np.mean([w.num_tokens for w in windows]))
            for hl in args.half_life:
                col = f"service {hl:g}w" + ("" if args.max_moves is None else f" K{args.max_moves}")
                root = Path(tmp) / f"hl{hl:g}"
                root.mkdir()  # moeplace creates no parent directories
                extra = ["--half-life", f"{hl * tokens_per_window:.0f}", "--time-limit", str(tl)]
                extra += ["--expert-bytes", str(EXPERT_BYTES[name])]
                extra += [] if args.max_moves is None else ["--max-moves", str(args.max_moves)]
                svc = Service(Path(tmp) / "plan.json", root / "state", root / "ds", *extra)
                services.append(svc)
                logs[col] = []
                pols[col] = service_policy(svc, meta, windows, root / "ds", logs[col])
                starts[col] = init["decide"]
            try:
                rows = replay(graphs, pols, starts, EXPERT_BYTES[name], first=1 if args.decide_after_window_0 else 2)
            finally:
                for svc in services:
                    svc.stop()
        print_stream(name, rows)
        for col, log in logs.items():
            print(f"{col}: POST /v1/replan seconds {[r['post_s'] for r in log]}, changed {[r['changed'] for r in log]}")
            work = [r["after"].get("target_anneal_moves") for r in log]
            print(f"{col}: the target's annealing moves per decision {work} ({TARGET_ANNEAL_MOVES}: its whole "
                  "budget, the decision repeats; less: cut at its deadline; None: no target)")  # fmt: skip
        everything[name] = {"rows": rows, "summary": summarise(rows), "service_decisions": logs}
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()
