"""Where a conversion writes: a marked temporary directory beside the target, renamed into place at the end.

Guarantees (docs/conversion.md, "What a conversion leaves behind"):

* the target never is, contains or lies inside the source (checked after resolving links, and by inode);
* an error, SIGINT or SIGTERM removes the temporary directory; an existing target is only replaced after the
  new one is complete, and only with ``force``;
* each temporary directory holds a marker file (a fixed string, the host name, the pid and its start time), so a
  later conversion into the same parent directory removes the temporaries of a killed conversion (``kill -9``)
  and only those: a marker of this host whose process is gone. A replaced target that a killed run had already
  moved aside is put back, never deleted;
* directories are created with the permissions of the umask, like the files in them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from megatron_tnllm.convert.errors import ConversionError, note
from megatron_tnllm.signals import sigterm_raises

MARKER = ".megatron-tnllm-convert"
MAGIC = "megatron-tnllm convert: temporary directory"
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-[A-Za-z0-9_]+$")
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


# ------------------------------------------------------------------------------------------ source vs target


def _ancestors(path: Path) -> list[Path]:
    """``path`` and every directory above it."""
    return [path, *path.parents]


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def check_separate(source: Path, target: Path) -> None:
    """ConversionError if ``target`` is, contains or lies inside ``source`` (links resolved; bind mounts and
    case-insensitive names caught by comparing inodes of the existing parts)."""
    s, t = Path(source).resolve(), Path(target).resolve()
    if s == t or any(_same(a, s) for a in _ancestors(t)):
        relation = "is" if s == t or _same(s, t) else "lies inside"
        raise ConversionError(f"target {target} {relation} the source {source}; expected a directory outside it")
    if t in s.parents or any(_same(a, t) for a in s.parents):
        raise ConversionError(f"target {target} contains the source {source}; expected a directory outside it")


# ------------------------------------------------------------------------------------------ markers


def _start_time(pid: int) -> str | None:
    """The start time of process ``pid`` (/proc/PID/stat field 22), to tell a reused pid apart; None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    return start is None or _start_time(pid) in (None, start)


def _write_marker(directory: Path, target: Path) -> None:
    pid = os.getpid()
    marker = {"magic": MAGIC, "host": socket.gethostname(), "pid": pid, "start": _start_time(pid)}
    marker["target"] = str(target)
    (directory / MARKER).write_text(json.dumps(marker) + "\n")


def _read_marker(directory: Path) -> dict | None:
    """The marker of a temporary directory of this converter, or None if it has none (or not ours)."""
    path = directory / MARKER
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 4096:
            return None
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("magic") != MAGIC or not isinstance(marker.get("pid"), int):
        return None
    return marker


def remove_stale_temporaries(parent: Path) -> list[Path]:
    """Removes the temporary directories in ``parent`` left by killed conversions on this host (see the module
    docstring); a target moved aside by a killed replacement is renamed back first. Returns what was removed."""
    removed = []
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return removed
    host = socket.gethostname()
    for entry in sorted(entries):
        match = _TEMPORARY.match(entry.name)
        if not match or entry.is_symlink() or not entry.is_dir():
            continue
        marker = _read_marker(entry)
        if marker is None or marker.get("host") != host or _alive(marker["pid"], marker.get("start")):
            continue
        target = Path(marker.get("target", ""))
        moved_aside = entry / target.name
        if match["kind"] == "old" and target.parent == entry.parent and moved_aside.is_dir() and not target.exists():
            moved_aside.rename(target)
            note(f"restored {target}, which a killed conversion (pid {marker['pid']}) had moved aside to replace it")
        shutil.rmtree(entry, ignore_errors=True)
        note(f"removed {entry}, left behind by a killed conversion (pid {marker['pid']} on {host})")
        removed.append(entry)
    return removed


# ------------------------------------------------------------------------------------------ the staging area


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # the only portable way to read it: set and restore
    os.umask(mask)
    return mask


def _marked_directory(parent: Path, prefix: str, target: Path) -> Path:
    """A new directory in ``parent`` with the umask's permissions (mkdtemp makes 0700) and a marker."""
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(directory, 0o777 & ~_umask())
    _write_marker(directory, target)
    return directory


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done (used where stopping half-way would lose data)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _os_error(e: OSError, target: Path) -> ConversionError:
    what = f"{e.filename}: " if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return ConversionError(
            f"no space left on the device of {target.parent} ({what}{e.strerror}); nothing was written "
            "(the temporary directory was removed)"
        )
    # A read-only or foreign parent directory, a source file that cannot be read, an I/O error: say which file.
    return ConversionError(f"{what}{e.strerror}; nothing was written to {target}")


@contextlib.contextmanager
def staged_output(source: Path, target: Path, force: bool) -> Iterator[Path]:
    """Yields an empty, marked temporary directory beside ``target``; when the block succeeds it becomes
    ``target`` (replacing an existing one only with ``force``). On any error or signal it is removed."""
    target = Path(target).absolute()
    check_separate(source, target)
    if target.exists() and not force:
        raise ConversionError(f"{target} already exists; pass --force to replace it")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _os_error(e, target) from None
    remove_stale_temporaries(target.parent)
    with sigterm_raises():
        staging = None
        try:
            with _signals_deferred():  # a signal between mkdtemp and the assignment would leave it behind
                staging = _marked_directory(target.parent, f".{target.name}.tmp-", target)
            yield staging
        except BaseException as e:
            if staging is not None:
                with _signals_deferred():
                    shutil.rmtree(staging, ignore_errors=True)
            if isinstance(e, OSError) and e.errno is not None:
                raise _os_error(e, target) from None
            raise
        with _signals_deferred():
            old = None
            try:
                if target.exists():
                    old = _marked_directory(target.parent, f".{target.name}.old-", target)
                    target.rename(old / target.name)
                staging.rename(target)
            except OSError as e:
                if old is not None and (old / target.name).exists() and not target.exists():
                    (old / target.name).rename(target)  # put the previous target back
                shutil.rmtree(staging, ignore_errors=True)
                if old is not None:
                    shutil.rmtree(old, ignore_errors=True)
                raise _os_error(e, target) from None
            if old is not None:
                shutil.rmtree(old)
            (target / MARKER).unlink()
