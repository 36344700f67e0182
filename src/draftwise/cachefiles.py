"""Files in draftwise's cache that survive a killed process, a full disk and two processes racing.

Every first-run file (the downloaded GGUF, the converted model directory, a compiled kernel) is written under a
temporary name, flushed to disk and renamed into place, so its final path holds a whole file or nothing. Writers
take a cross-process lock: an OS-level lock (flock), which the kernel drops when its holder dies, so a killed
process never leaves a lock that later runs wait on; leftovers of a killed writer are removed by the next holder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from draftwise.errors import DraftwiseError

LOCK_TIMEOUT_S = 900.0  # a first download on a slow link plus the conversion fits well inside


def seconds_from_env(variable: str, default: float) -> float:
    """A timeout in seconds from the environment variable `variable`, else `default`."""
    value = os.environ.get(variable, "")
    try:
        return float(value) if value else default
    except ValueError:
        raise DraftwiseError(f"{variable} must be a number of seconds, not '{value}'") from None


@contextlib.contextmanager
def cache_lock(path: Path, doing: str) -> Iterator[None]:
    """Hold the cross-process lock `path` while `doing` (words for messages: "converting smollm2-135m").
    Waits up to $DRAFTWISE_LOCK_TIMEOUT seconds (default LOCK_TIMEOUT_S) for another holder, saying so on stderr,
    then raises a DraftwiseError naming the lock file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        timeout = seconds_from_env("DRAFTWISE_LOCK_TIMEOUT", LOCK_TIMEOUT_S)
        print(f"[draftwise] waiting for another draftwise process {doing} (lock {path})", file=sys.stderr, flush=True)
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise DraftwiseError(
                f"waited {timeout:.0f} s for {path}, held by another draftwise process {doing}; "
                "let it finish, or set DRAFTWISE_LOCK_TIMEOUT to wait longer"
            ) from None
    try:
        yield
    finally:
        lock.release()


def fsync_dir(path: Path) -> None:
    """Make a rename or creation inside directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush every file under `path`, then the directories, to disk."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(Path(root))


def publish_file(staged: Path, final: Path) -> None:
    """Flush `staged` and rename it over `final` (same directory): readers see the old file or the whole new one."""
    with open(staged, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(staged, final)
    fsync_dir(final.parent)


def write_file_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file, fsync and rename."""
    handle, staged = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as out:
            out.write(text)
        publish_file(Path(staged), path)
    finally:
        Path(staged).unlink(missing_ok=True)


def publish_dir(staged: Path, final: Path) -> bool:
    """Flush directory `staged` and rename it to `final` (same parent). When `final` already exists (another process
    got there first), `staged` is deleted and False returned; the existing `final` is kept."""
    fsync_tree(staged)
    try:
        staged.rename(final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(staged, ignore_errors=True)
        return False
    fsync_dir(final.parent)
    return True


def remove_leftovers(directory: Path, pattern: str) -> None:
    """Delete what killed writers left in `directory` under names matching `pattern` (call it holding the lock
    that those writers held: then no live process is writing them)."""
    for leftover in directory.glob(pattern):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
