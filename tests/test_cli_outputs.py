"""Every ``moeplace`` command that writes follows one output rule (placement/trace/outputs.py) and reports a bad
output as one ``error:`` line, exit code 1, no traceback, nothing written: a read-only directory, ``--out``
naming a directory where a file goes, a missing parent directory, a parent that is a file. The checks run before
the long work. And every command takes ``-h``, has help, and shows flags as flags."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

from placement.plan import Plan
from placement.trace.dataset import write_trace
from placement.trace.outputs import OutputError, check_output
from placement.trace.synthetic import synthetic_trace


def _readonly_dir() -> Path | None:
    """A directory that cannot be written even by root: /sys (sysfs refuses new files; chmod does not stop root)."""
    for cand in (Path("/sys"),):
        if cand.is_dir():
            try:
                fd, name = tempfile.mkstemp(dir=cand)
            except OSError:
                return cand
            os.close(fd)
            Path(name).unlink()
    return None


READONLY = _readonly_dir()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("inputs")
    meta, r = synthetic_trace(4, 8, 2, 400, tokens_per_prompt=20, seed=0)
    write_trace(d / "trace", meta, r)
    np.savez(d / "routes.npz", routes=r.expert_ids_TLK, num_experts=8)
    Plan(4, 1, 8, meta.layers, np.tile(np.arange(8), (4, 1))).save(d / "plan.json")
    (d / "a-file").write_text("x")
    return {"trace": d / "trace", "npz": d / "routes.npz", "plan": d / "plan.json", "file": d / "a-file"}


def _commands(f: dict[str, Path]) -> dict[str, tuple[list[object], str]]:
    """command -> (arguments before the output option, the output option) of each writing command."""
    return {
        "plan": (["plan", "--trace", f["trace"], "--gpus", 4, "--solver", "contiguous"], "--out"),
        "export": (["export", "--plan", f["plan"], "--format", "sglang"], "--out"),
        "import": (["import", f["npz"], "--format", "npz"], "--out"),
        "import-loads": (["import", f["npz"], "--format", "npz", "--loads-only"], "--out"),
        "graph": (["graph", f["trace"]], "--graphml"),
        "report": (["report", "--trace", f["trace"]], "--out"),
        "profile": (["profile", "--limit", 2], "--out"),
        "demo": (["demo", "--gpus", 4, "--no-report"], "--out"),
        "replan": (["replan", "--current", f["plan"], "--trace", f["trace"], "--max-moves", 0], "--out"),
        "serve": (["serve", "--plan", f["plan"], "--token", "t0ken", "--port", 0], "--state"),
    }


WRITERS = ["plan", "export", "import", "import-loads", "graph", "report", "profile", "demo", "replan", "serve"]
FILE_OUTPUTS = ["plan", "export", "import-loads", "graph", "report", "replan"]


def _one_error(cli, *args: object) -> str:
    code, out, err = cli(*args)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), (code, out, err)
    assert "Traceback" not in out + err
    return lines[0]


def _name(cmd: str) -> str:
    return "r.html" if cmd == "report" else "out.json" if cmd in FILE_OUTPUTS else "out"


@pytest.mark.skipif(READONLY is None, reason="no directory here that refuses writes to root (/sys)")
@pytest.mark.parametrize("cmd", WRITERS)
def test_read_only_directory_is_one_line(cli, files: dict[str, Path], cmd: str) -> None:
    assert READONLY is not None
    args, opt = _commands(files)[cmd]
    target = READONLY / _name(cmd)
    line = _one_error(cli, *args, opt, target)
    assert f"cannot write in {READONLY}" in line and str(target) in line
    assert not target.exists()


@pytest.mark.parametrize("cmd", WRITERS)
def test_missing_parent_and_parent_that_is_a_file(cli, files: dict[str, Path], tmp_path: Path, cmd: str) -> None:
    args, opt = _commands(files)[cmd]
    missing = tmp_path / "no" / "such" / _name(cmd)
    assert "does not exist; create it first" in _one_error(cli, *args, opt, missing)
    under_file = files["file"] / _name(cmd)  # ENOTDIR: fails for root too
    assert f"{files['file']} is a file, not a directory" in _one_error(cli, *args, opt, under_file)
    assert list(tmp_path.iterdir()) == []  # no parent directory was created


@pytest.mark.parametrize("cmd", FILE_OUTPUTS)
def test_out_naming_a_directory(cli, files: dict[str, Path], tmp_path: Path, cmd: str) -> None:
    args, opt = _commands(files)[cmd]
    d = tmp_path / _name(cmd)
    d.mkdir()
    (d / "keep").write_text("x")
    assert "is a directory; give a file name" in _one_error(cli, *args, opt, d)
    assert "is a directory; give a file name" in _one_error(cli, *args, opt, d, "--force")
    assert [p.name for p in d.iterdir()] == ["keep"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [d.name]  # no temp file left behind


@pytest.mark.parametrize("cmd", ["import", "profile", "demo", "serve"])
def test_dataset_output_that_is_a_file(cli, files: dict[str, Path], cmd: str) -> None:
    args, opt = _commands(files)[cmd]
    assert "exists and is not a dataset directory" in _one_error(cli, *args, opt, files["file"])
    assert files["file"].read_text() == "x"


def test_one_overwrite_rule_for_files(cli, files: dict[str, Path], tmp_path: Path) -> None:
    """plan, graph, export, report and import --loads-only refuse an existing file unless --force, which replaces
    it; the refusal comes before the long work (an impossible ILP balance would fail later, in the solve)."""
    for cmd in FILE_OUTPUTS:
        args, opt = _commands(files)[cmd]
        out = tmp_path / _name(cmd)
        out.write_text("keep me")
        assert "already exists; pass --force" in _one_error(cli, *args, opt, out)
        assert out.read_text() == "keep me"
        code, _, err = cli(*args, opt, out, "--force")
        assert code == 0, err
        assert out.read_text() != "keep me"
        out.unlink()
    out = tmp_path / "p.json"
    out.write_text("keep me")
    ilp = ["plan", "--trace", files["trace"], "--gpus", 4, "--solver", "ilp", "--balance", 0, "--out", out]
    assert "already exists" in _one_error(cli, *ilp)
    assert "--balance" in _one_error(cli, *ilp, "--force")  # the solve runs only once the output is fine
    assert out.read_text() == "keep me"


def test_replan_checks_its_move_list_output_too(cli, files: dict[str, Path], tmp_path: Path) -> None:
    args = ["replan", "--current", files["plan"], "--trace", files["trace"], "--max-moves", 0]
    args += ["--out", tmp_path / "new.json", "--moves-out"]
    assert "--moves-out" in _one_error(cli, *args, tmp_path / "no" / "m.json")
    (tmp_path / "m.json").write_text("keep me")
    assert "--moves-out" in (line := _one_error(cli, *args, tmp_path / "m.json")) and "already exists" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]  # the plan was not written either


def test_datasets_are_appended_not_replaced(cli, files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "ds"
    for _ in range(2):
        code, _, err = cli("import", files["npz"], "--format", "npz", "--out", out)
        assert code == 0, err
    from placement.trace.dataset import open_trace

    assert open_trace(out).num_tokens == 2 * open_trace(files["npz"]).num_tokens


def test_os_errors_during_the_write_are_one_line(cli, files: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    """An OS error after the checks (a full disk) is one line naming the path, and leaves no temp file."""
    import placement.trace.outputs as outputs

    monkeypatch.setattr(outputs.os, "fdopen", lambda fd, mode: _Failing(fd))
    line = _one_error(cli, "plan", "--trace", files["trace"], "--gpus", 4, "--solver", "contiguous",
                      "--out", tmp_path / "p.json")  # fmt: skip
    assert line.startswith(f"error: {tmp_path}/.p.json.") and line.endswith(".tmp: No space left on device")
    assert list(tmp_path.iterdir()) == []


class _Failing:
    """A file object whose write fails like a full disk."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.name = os.readlink(f"/proc/self/fd/{fd}")

    def __enter__(self) -> _Failing:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    def write(self, data: bytes) -> int:
        raise OSError(28, "No space left on device", self.name)


def test_check_output_library_rules(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    assert check_output(tmp_path / "new.json") == tmp_path / "new.json"
    assert check_output(tmp_path / "f", force=True) == tmp_path / "f"
    assert check_output(tmp_path, kind="dataset") == tmp_path
    with pytest.raises(OutputError, match="already exists"):
        check_output(tmp_path / "f")
    with pytest.raises(OutputError, match=r"--graphml .*is a directory"):
        check_output(tmp_path, force=True, flag="--graphml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # the probe file is gone


# ---------------------------------------------------------------------------------------------- CLI habits


def _all_commands() -> list[str]:
    from placement.cli import build_app

    return [c.name or "" for c in build_app().registered_commands]


def test_h_works_everywhere_and_every_command_has_help(cli) -> None:
    code, out, _ = cli("-h")
    assert code == 0 and "Usage: moeplace" in out and "Commands:" in out
    names = _all_commands()
    assert {"import", "stats", "graph", "plan", "eval", "profile", "ep-bench", "export", "report", "demo"} <= set(names)
    for name in names:
        code, out, _ = cli(name, "-h")
        assert code == 0 and f"Usage: moeplace {name}" in out, (name, out)
        text = out.split("Options:")[0].split("\n", 1)[1].strip()
        assert len(text) > 20, f"{name}: no help text"
        assert "<bool>" not in out, f"{name}: a flag is shown as <bool>"
        assert "-h, --help" in out


def test_plan_help_explains_cost_gap_and_forecast(cli) -> None:
    out = cli("plan", "-h")[1]
    assert "cost:" in out.replace("\n", " ") or "reports cost" in out
    assert "gap:" in out and "proven optimal" in out.replace("\n  ", " ")


def test_help_wraps_to_the_terminal(cli) -> None:
    code, out, _ = cli("ep-bench", "-h")
    assert code == 0
    assert max(len(ln) for ln in out.splitlines()) <= 80  # CliRunner's terminal is 80 columns
    assert not any(ln.strip() in ("routes", "experts,") for ln in out.splitlines())  # no orphan words


def test_failed_report_leaves_no_figures(cli, files: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    import placement.report as report

    real = report.atomic_write_bytes

    def full_at_html(path: Path, data: bytes) -> None:
        if path.suffix == ".html":
            raise OSError(28, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(report, "atomic_write_bytes", full_at_html)
    line = _one_error(cli, "report", "--trace", files["trace"], "--out", tmp_path / "r.html")
    assert line == f"error: {tmp_path / 'r.html'}: No space left on device"
    assert list(tmp_path.iterdir()) == []
