"""Outputs: the one rule for everything moeplace writes, checked before any long work, and atomic writes.

The rule (README "Outputs"):

- a **file or directory output** (a plan, a GraphML file, an export, a report, a loads JSON) that already exists
  is refused unless ``force``; with ``force`` the new output is written next to it and renamed over it, so a
  reader sees the old one or the new one, never a mix;
- a **dataset directory** (``import``, ``profile``) is appended to or resumed (same model only), never replaced;
- the **parent directory** of an output must exist: moeplace never creates it (a typo in a path fails at once
  instead of growing a stray tree).

``check_output`` tests all of this (and that the directory can really be written, with a probe file) in well
under a second, so a bad ``--out`` fails before a solve or a profile rather than after it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Literal

OutputKind = Literal["file", "dir", "dataset"]


class OutputError(ValueError):
    """An output that cannot be written; the message is one line naming the path and how to fix it."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same directory and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _missing_parent(path: Path, flag: str) -> OutputError:
    """The error for a parent directory that does not exist (naming a file in the way, if that is why)."""
    for anc in path.parents:
        if anc.exists():
            if not anc.is_dir():
                return OutputError(f"{flag} {path}: {anc} is a file, not a directory; choose another {flag}")
            break
    return OutputError(
        f"{flag} {path}: directory {path.parent} does not exist; create it first (moeplace does not create "
        f"parent directories) or choose another {flag}"
    )


def _probe(directory: Path, path: Path, flag: str) -> None:
    """Create and remove a hidden file in ``directory``: the only test of writability that also holds for root."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".moeplace-probe-", suffix=".tmp", dir=directory)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OutputError(f"{flag} {path}: cannot write in {directory} ({reason}); choose another {flag}") from None
    os.close(fd)
    Path(tmp).unlink(missing_ok=True)


def check_output(
    path: str | os.PathLike[str], *, force: bool = False, kind: OutputKind = "file", flag: str = "--out"
) -> Path:
    """Raise OutputError unless ``path`` can be written under the rule of this module; returns it as a Path.

    ``kind``: ``file`` (must not be a directory), ``dir`` (an output directory, replaced as a whole) or
    ``dataset`` (a dataset directory, appended to). Nothing is created or changed.
    """
    p = Path(path)
    parent = p.parent
    if not parent.is_dir():
        raise _missing_parent(p, flag)
    exists = p.exists() or p.is_symlink()
    if kind == "dataset":
        if exists and not p.is_dir():
            raise OutputError(f"{flag} {p}: exists and is not a dataset directory; choose another {flag}")
        _probe(p if exists else parent, p, flag)
        return p
    if kind == "file" and p.is_dir():
        raise OutputError(f"{flag} {p}: is a directory; give a file name")
    if exists and not force:
        raise OutputError(f"{flag} {p}: already exists; pass --force to replace it or choose another {flag}")
    _probe(parent, p, flag)
    return p


def os_error_line(exc: OSError) -> str:
    """One line for an OS error: the path(s) it names and the system's reason."""
    where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{where}: {reason}" if where else reason


__all__ = ["OutputError", "atomic_write_bytes", "check_output", "os_error_line"]
