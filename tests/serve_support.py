"""Helpers of the service tests: a real ``moeplace serve`` in a subprocess on a free 127.0.0.1 port, small
synthetic traffic, and shards written the way ``moeplace profile`` writes them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from placement.plan import Plan, gpu_of_expert_to_phy2log
from placement.trace.dataset import TraceWriter
from placement.trace.schema import RouteArrays, TraceMeta
from placement.trace.synthetic import synthetic_trace

REPO = Path(__file__).resolve().parents[1]
TOKEN = "test-token-0123456789"
L, E, K, G = 4, 16, 2, 4


def traffic(num_tokens: int, seed: int, num_experts: int = E, **kw: Any) -> tuple[TraceMeta, RouteArrays]:
    """Synthetic routing of the test model (32-token prompts), or of another one with ``num_experts``."""
    return synthetic_trace(L, num_experts, K, num_tokens, tokens_per_prompt=32, seed=seed, **kw)


def initial_plan(path: Path) -> Plan:
    """Contiguous placement (expert e on GPU e // (E / G)) of the synthetic model."""
    gpu_of_LE = np.tile(np.arange(E) // (E // G), (L, 1))
    plan = Plan(G, 1, E, tuple(range(L)), gpu_of_expert_to_phy2log(gpu_of_LE, G), model_name="synthetic")
    plan.save(path)
    return plan


def write_shard(dataset: Path, meta: TraceMeta, routes: RouteArrays, writer: str) -> Path:
    with TraceWriter(dataset, meta, writer_id=writer) as w:
        w.write(routes.expert_ids_TLK, routes.seq_ids_T, routes.token_pos_T)
    return w.shards_written[-1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``python -m placement serve`` in a subprocess; ``url``, ``get``/``post`` over real HTTP."""

    def __init__(self, plan: Path, state: Path, watch: Path | None, *extra: str) -> None:
        self.args = [str(plan), str(state), str(watch) if watch else None, *extra]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "placement", "serve", "--plan", str(plan), "--state", str(state)]
        cmd += ["--port", str(self.port), "--token", TOKEN, "--poll", "0.1", "--log-level", "warning"]
        cmd += ["--watch", str(watch)] if watch else []
        cmd += list(extra) if "--interval" in extra else [*extra, "--interval", "0"]
        self.log = state.parent / f"server-{self.port}.log"
        self._log_fh = open(self.log, "wb")  # closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._log_fh, stderr=subprocess.STDOUT, env=dict(os.environ))
        self.client = httpx.Client(base_url=self.url, timeout=60)
        self._wait_up()

    def _wait_up(self, timeout: float = 120) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if self.client.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server did not come up: {self.log.read_text()[-2000:]}")

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.client.get(path, **kw)

    def post(self, path: str, token: str | None = TOKEN, **kw: Any) -> httpx.Response:
        headers = dict(kw.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return self.client.post(path, headers=headers, **kw)

    def status(self) -> dict[str, Any]:
        r = self.get("/v1/status")
        r.raise_for_status()
        out: dict[str, Any] = r.json()
        return out

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 60) -> dict[str, Any]:
        t0 = time.monotonic()
        while True:
            st = self.status()
            if pred(st):
                return st
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"status never matched: {st}")
            time.sleep(0.1)

    def stop(self) -> int:
        """SIGTERM, as a process manager stops it; returns the exit code."""
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_fh.close()
        return int(self.proc.returncode)
