"""Writing files so that a crash, a full disk or Ctrl-C leaves the old version or the new one, never half of one;
and a cross-process lock for the files draftwise makes on first use (downloaded model, conversion, kernels)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from draftwise.core.errors import DraftwiseError

LOCK_TIMEOUT_S = 900.0  # a first download on a slow link plus the conversion fits well inside


def fsync_tree(directory: Path) -> None:
    """Flush every file under `directory` to disk, so that a rename after it never publishes empty files."""
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield an empty staging directory beside `path`; once the block succeeds it replaces `path`. An older `path`
    is renamed aside first and deleted only once the new one is in place; on failure the staging is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield staging
        fsync_tree(staging)
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rename(path, old / path.name)
        os.rename(staging, path)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write `data` to `path` through a temporary file beside it, flushed, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        publish_file(Path(tmp), path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_dir(path: Path) -> None:
    """Make a rename or creation inside directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_file(staged: Path, final: Path) -> None:
    """Flush the written file `staged` and rename it over `final` (same file system): readers see the old file or
    the whole new one."""
    with open(staged, "rb") as f:
        os.fsync(f.fileno())
    os.replace(staged, final)
    fsync_dir(final.parent)


def seconds_from_env(variable: str, default: float) -> float:
    """A timeout in seconds from the environment variable `variable`, else `default`."""
    value = os.environ.get(variable, "")
    try:
        return float(value) if value else default
    except ValueError:
        raise DraftwiseError(f"{variable} must be a number of seconds, not '{value}'") from None


@contextmanager
def cache_lock(path: Path, doing: str) -> Iterator[None]:
    """Hold the cross-process lock `path` while `doing` (words for messages: "converting smollm2-135m").
    An OS-level lock (flock): the kernel drops it when its holder dies, so a killed process never leaves a lock
    that later runs wait on. Waits up to $DRAFTWISE_LOCK_TIMEOUT seconds (default LOCK_TIMEOUT_S) for another
    holder, saying so on stderr, then raises a DraftwiseError naming the lock file."""
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


def remove_leftovers(directory: Path, pattern: str) -> None:
    """Delete what killed writers left in `directory` under names matching `pattern`. Call it holding the lock
    those writers held: then no live process is writing them."""
    for leftover in directory.glob(pattern):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def read_user_text(path: str | Path, what: str = "file") -> str:
    """A file a user named, as UTF-8 text, or one clear error saying why not."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DraftwiseError(f"{what} {path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from exc
    except OSError as exc:
        raise DraftwiseError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
