"""Shared fixtures: the real traces in ../shared/traces, a CLI runner, and an independent graph reference."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]

SHARED_TRACES = REPO.parent / "shared" / "traces"

# Hypothesis profiles (tests/test_fuzz_inputs.py): "ci" when CI=true (time-boxed), else HYPOTHESIS_PROFILE or "dev";
# "long" is the documented longer run (docs/testing.md).
settings.register_profile("ci", max_examples=25, deadline=timedelta(seconds=10), derandomize=True)
settings.register_profile("dev", max_examples=60, deadline=None)
settings.register_profile("long", max_examples=2000, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") == "true" else os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# (trace spec relative to SHARED_TRACES, expected T, K) of every shared per-token trace
SHARED_SPECS = [
    ("deepseek-v2-lite-chat.dev.npz", 94165, 6),
    ("flame-moe-290m.npz", 640, 6),
    ("mixtral-8x7b-instruct.humaneval0.npz:prefill", 135, 2),
    ("mixtral-8x7b-instruct.humaneval0.npz:decode", 83, 2),
]


@pytest.fixture(scope="session")
def traces_dir() -> Path:
    if not (SHARED_TRACES / "README.md").exists():
        pytest.skip(f"real traces not found at {SHARED_TRACES} (checkout without ../shared)")
    return SHARED_TRACES


class Cli:
    """Runs the ``moeplace`` typer app in-process; returns (exit code, stdout, stderr)."""

    def __init__(self) -> None:
        from placement.cli import build_app

        self.app = build_app()
        self.runner = CliRunner()

    def __call__(self, *args: object) -> tuple[int, str, str]:
        res = self.runner.invoke(self.app, [str(a) for a in args])
        if res.exception is not None and not isinstance(res.exception, SystemExit):
            raise res.exception
        return res.exit_code, res.stdout, res.stderr


@pytest.fixture(scope="session")
def cli() -> Cli:
    return Cli()


def reference_graph(ids_TLK: np.ndarray, E: int, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Independent numpy reference of METRICS.md counting: (load_LE, trans_LEE).

    Sets per token and layer: ids sorted, negatives and repeats masked out; pairs counted with bincount over
    flattened (layer, i, j) indices, chunk by chunk.
    """
    T, L, _ = ids_TLK.shape
    load = np.zeros(L * E, np.int64)
    trans = np.zeros(max(L - 1, 0) * E * E, np.int64)
    for a in range(0, T, chunk):
        s = np.sort(ids_TLK[a : a + chunk].astype(np.int64), axis=2)
        keep = s >= 0
        keep[:, :, 1:] &= s[:, :, 1:] != s[:, :, :-1]
        e = np.where(keep, s, 0)
        lidx = np.arange(L)[None, :, None]
        load += np.bincount((lidx * E + e).ravel(), weights=keep.ravel(), minlength=L * E).astype(np.int64)
        if L > 1:
            i, j = e[:, :-1, :, None], e[:, 1:, None, :]
            w = keep[:, :-1, :, None] & keep[:, 1:, None, :]
            flat = (np.arange(L - 1)[None, :, None, None] * E + i) * E + j
            trans += np.bincount(flat.ravel(), weights=w.ravel(), minlength=trans.size).astype(np.int64)
    return load.reshape(L, E), trans.reshape(max(L - 1, 0), E, E)


def listing(path: Path) -> list[str]:
    """Every file and directory under ``path`` (and its siblings' temp files), for 'nothing left behind'."""
    root = path if path.is_dir() else path.parent
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def topic_trace_dir(factory: pytest.TempPathFactory, num_tokens: int) -> Path:
    """A small synthetic trace dataset (4 layers x 8 experts, top-2, 4 topics of prompts of 20 tokens) on disk."""
    from placement.trace.dataset import write_trace
    from placement.trace.synthetic import synthetic_trace

    meta, r = synthetic_trace(4, 8, 2, num_tokens, tokens_per_prompt=20, num_preferred=2, num_topics=4, seed=0)
    out = factory.mktemp("ds") / "trace"
    write_trace(out, meta, r)
    return out


def one_error_line(stderr: str) -> str:
    """The one ``error:`` line a failed command prints on stderr (asserting there is nothing else)."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]
