"""What every exporter shares: the error type, the result record, and atomic outputs (a temp file or directory
next to the target, renamed over it on success and removed on error, so nothing is ever half-written)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from placement.trace.outputs import OutputError, check_output


class ExportError(ValueError):
    """An export that cannot be done; the message is one line naming the input and how to fix it."""


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote, the launch flags that use it, and warnings for the user."""

    paths: tuple[Path, ...]
    flags: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------- atomic outputs


def check_out(out: Path, force: bool, is_dir: bool = True) -> None:
    """Refuse an output that cannot be written under moeplace's one output rule (placement.trace.outputs): an
    existing one unless ``force``, a missing or read-only parent directory, a directory where a file goes."""
    try:
        check_output(out, force=force, kind="dir" if is_dir else "file")
    except OutputError as exc:
        raise ExportError(str(exc)) from None


@contextmanager
def atomic_output(out: Path, force: bool, is_dir: bool) -> Iterator[Path]:
    """Yield a temp file or directory next to ``out``; it replaces ``out`` on success, is removed on error."""
    check_out(out, force, is_dir)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        tmp = Path(name)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod((0o777 if is_dir else 0o666) & ~umask)  # mkstemp/mkdtemp make them private
    try:
        yield tmp
        if is_dir:  # some writers (safetensors) create private files too
            for f in tmp.rglob("*"):
                if f.is_file() and not f.is_symlink():
                    f.chmod(0o666 & ~umask)
        replace_path(tmp, out)
    except BaseException:
        remove_path(tmp)
        raise


def replace_path(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` (``--force``) is moved aside first, then deleted."""
    if not (out.exists() or out.is_symlink()):
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.replace(out, old / "previous")
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old / "previous", out)
        raise
    finally:
        remove_path(old)


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")
