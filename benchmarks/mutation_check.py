"""Mutation check: plant one known bug at a time in a copy of the working tree and see whether the tests catch it.

Each mutant is a small source substitution in a key function (colocation, the load split, EPLB, plan
validation, the graph's count of unrecorded ids, the SGLang / vLLM exports). The relevant test files run against
the mutated copy (``pytest -x -m "not slow"``). A mutant is *caught* when a test fails and *survived* when they
all pass. The unmutated copy runs first, and its tests must pass. Not part of CI; docs/mutation_check.md explains
how to run it (about 5 minutes on 2 cores):

    python benchmarks/mutation_check.py [--only NAME ...] [--timeout SECONDS]

Prints one row per mutant: its name, caught or SURVIVED, the seconds its tests took, and the first failing test.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METRICS_TESTS = ("tests/test_plan_metrics.py", "tests/test_eplb.py")
EPLB_TESTS = ("tests/test_eplb.py", "tests/test_solvers.py")
PLAN_TESTS = ("tests/test_plan_metrics.py",)
GRAPH_TESTS = ("tests/test_plan_metrics.py", "tests/test_graph.py")
EXPORT_TESTS = (
    "tests/test_engines.py",
    "tests/test_export.py::test_sglang_map_has_every_expert_per_row_and_trivial_dense_rows",
)


@dataclass(frozen=True)
class Mutant:
    """Replace ``old`` (which must occur exactly once in ``path``) by ``new`` and run ``tests``."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = (
    Mutant(
        "colocation: layers swapped",
        "placement/metrics.py",
        'np.einsum("xig,xjg->xij", H_LEG[:-1], H_LEG[1:])',
        'np.einsum("xig,xjg->xij", H_LEG[1:], H_LEG[:-1])',
        METRICS_TESTS,
    ),
    Mutant(
        "colocation: only an expert's first holder",
        "placement/metrics.py",
        "H_LEG = (plan.holders_LEG > 0).astype(np.float32)",
        "H_LEG = (plan.holders_LEG.argmax(axis=2)[..., None] == np.arange(plan.num_gpus)).astype(np.float32)",
        METRICS_TESTS,
    ),
    Mutant(
        "load split: two copies on one GPU count twice",
        "placement/metrics.py",
        "H_LEG = (plan.holders_LEG > 0).astype(np.float64)",
        "H_LEG = plan.holders_LEG.astype(np.float64)",
        METRICS_TESTS,
    ),
    Mutant(
        "load split: replicas not shared (full load on each)",
        "placement/metrics.py",
        "return np.asarray(H_LEG / H_LEG.sum(axis=2, keepdims=True))",
        "return np.asarray(H_LEG)",
        METRICS_TESTS,
    ),
    Mutant(
        "solve_eplb returns the contiguous layout",
        "placement/solvers/baselines.py",
        "        phy = eplb_phy2log(load, P, spec.num_gpus, spec.num_nodes)",
        "        phy = contiguous_phy2log(load, P, spec.num_gpus)",
        EPLB_TESTS,
    ),
    Mutant(
        "eplb: replicas packed at full load, not split",
        "placement/solvers/baselines.py",
        "per_phy_XQ = np.take_along_axis(w_XI / cnt_XI, phy_XQ, axis=1)",
        "per_phy_XQ = np.take_along_axis(w_XI, phy_XQ, axis=1)",
        EPLB_TESTS,
    ),
    Mutant(
        "eplb: next replica to the heaviest total, not per copy",
        "placement/solvers/baselines.py",
        "hot_X = np.argmax(weight_XI / count_XI, axis=1)",
        "hot_X = np.argmax(weight_XI, axis=1)",
        EPLB_TESTS,
    ),
    Mutant(
        "eplb: nodes ignored",
        "placement/solvers/baselines.py",
        "N = num_nodes if E % num_nodes == 0 and num_slots % num_nodes == 0 else 1",
        "N = 1",
        EPLB_TESTS,
    ),
    Mutant(
        "eplb: one item per pack sorted by load",
        "placement/solvers/baselines.py",
        "    if I != num_packs:\n        return balanced_packing(weight_XI, num_packs)",
        "    if True:\n        return balanced_packing(weight_XI, num_packs)",
        EPLB_TESTS,
    ),
    Mutant(
        "plan validation: P % G check removed",
        "placement/plan.py",
        "        if P % G:\n",
        "        if False:\n",
        PLAN_TESTS,
    ),
    Mutant(
        "plan validation: negative-id check removed",
        "placement/plan.py",
        "bad_LP = (phy2log_LP < 0) | (phy2log_LP >= E)",
        "bad_LP = phy2log_LP >= E",
        PLAN_TESTS,
    ),
    Mutant(
        "graph: an unrecorded id (-1) counted as expert E-1",
        "placement/graph.py",
        "                if e >= 0:\n                    load_SLE[s, l, e] += 1",
        "                if e >= -1:\n                    load_SLE[s, l, e] += 1",
        GRAPH_TESTS,
    ),
    Mutant(
        "sglang export: MoE rows shifted one layer down",
        "placement/deploy/export.py",
        "out_LP[list(plan.layers)] = plan.phy2log",
        "out_LP[[l - 1 for l in plan.layers]] = plan.phy2log",
        EXPORT_TESTS,
    ),
    Mutant(
        "sglang export: --ep-num-redundant-experts printed as P",
        "placement/deploy/export.py",
        'f"--ep-num-redundant-experts {plan.num_slots - plan.num_experts}"',
        'f"--ep-num-redundant-experts {plan.num_slots}"',
        EXPORT_TESTS,
    ),
    Mutant(
        "vllm export: a placement strategy vLLM rejects",
        "placement/deploy/export.py",
        '"--expert-placement-strategy linear"',
        '"--expert-placement-strategy custom"',
        EXPORT_TESTS,
    ),
)


def copy_working_tree(dst: Path) -> None:
    """Tracked and untracked-but-not-ignored files of the repository, as they are now."""
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout
    for rel in filter(None, out.decode().split("\0")):
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def run_tests(root: Path, tests: tuple[str, ...], timeout: float) -> tuple[bool, str, float]:
    """(passed, first failing test or reason, seconds) of ``pytest -x -m "not slow"`` in ``root``."""
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-m", "not slow", "-p", "no:cacheprovider", *tests]
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:.0f} s", time.perf_counter() - t0
    secs = time.perf_counter() - t0
    failed = re.search(r"^(FAILED|ERROR) (\S+)", res.stdout, re.M)
    return res.returncode == 0, failed.group(2) if failed else res.stdout.strip()[-120:], secs


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None, help="Run only mutants whose name contains one of these.")
    ap.add_argument("--timeout", type=float, default=600.0, help="Seconds per test run.")
    args = ap.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.only or any(s in m.name for s in args.only)]
    with tempfile.TemporaryDirectory(prefix="moeplace-mutants-") as tmp:
        root = Path(tmp)
        copy_working_tree(root)
        where = subprocess.run(
            [sys.executable, "-c", "import placement; print(placement.__file__)"],
            cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
        if not where.startswith(str(root)):
            print(f"error: the copy imports placement from {where}, not from {root}", file=sys.stderr)
            return 2
        for tests in sorted({m.tests for m in mutants}):
            ok, why, secs = run_tests(root, tests, args.timeout)
            if not ok:
                print(f"error: unmutated tests fail ({' '.join(tests)}): {why}", file=sys.stderr)
                return 2
        print(f"{'mutant':<58} {'result':<9} {'s':>5}  first failing test")
        survived = 0
        for m in mutants:
            path = root / m.path
            text = path.read_text()
            if text.count(m.old) != 1:
                print(f"{m.name:<58} {'STALE':<9} {'':>5}  the code to mutate was not found once in {m.path}")
                survived += 1
                continue
            path.write_text(text.replace(m.old, m.new))
            try:
                ok, why, secs = run_tests(root, m.tests, args.timeout)
            finally:
                path.write_text(text)
            survived += ok
            print(f"{m.name:<58} {'SURVIVED' if ok else 'caught':<9} {secs:5.0f}  {'' if ok else why}", flush=True)
        print(f"{len(mutants) - survived} of {len(mutants)} mutants caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
