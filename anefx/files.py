"""Files anefx writes for users, written so that no failure costs the user what was at the path before.

Every package (`CompiledModel.save`, `anefx compile`, `anefx demo`) and every page (`anefx diff --html`)
is first written into a hidden temporary sibling of its target (`.NAME.XXXX.anefx-tmp`, in the same
directory so the final rename stays on one file system), flushed to disk, then renamed onto the target.
Until that rename the old file or package is untouched: an error, SIGTERM or SIGINT while writing removes
the temporary copy, leaves the target as it was, then lets the signal do what it would have done.
An existing .mlpackage is replaced in one step (on Linux and macOS the two directories are swapped
atomically); anything else at a package's path is refused, never deleted. Concurrent writers of one
path do not fail: the last one to finish wins.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from anefx.errors import AnefxError

PACKAGE_SUFFIX = ".mlpackage"
TEMP_SUFFIX = ".anefx-tmp"
_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_REPLACE_ATTEMPTS = 50
_ADVICE = {
    errno.ENOSPC: "free some disk space or write to another disk",
    errno.EDQUOT: "free some disk space or write to another disk",
    errno.EACCES: "choose a directory you can write to",
    errno.EPERM: "choose a directory you can write to",
    errno.EROFS: "the file system is read-only: choose another directory",
    errno.ENOTDIR: "a part of the path is a file, not a directory: choose another path",
    errno.EEXIST: "a part of the path is a file, not a directory: choose another path",
    errno.EISDIR: "a directory is in the way: choose another path",
    errno.ENAMETOOLONG: "choose a shorter path",
}


class FileWriteError(AnefxError):
    """A file or package could not be written; what was at its path is unchanged."""


class WriteInterrupted(BaseException):  # noqa: N818 - not an error: a signal, delivered again afterwards
    """SIGTERM or SIGINT arrived while writing: unwinds the write so the temporary copy is removed."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def package_path(path: str | Path) -> Path:
    """The path a package is written to: `path` with the .mlpackage suffix (added when missing)."""
    path = Path(path)
    return path if path.suffix == PACKAGE_SUFFIX else path.with_suffix(PACKAGE_SUFFIX)


def is_package(path: Path) -> bool:
    return path.is_dir() and (path / "Manifest.json").is_file()


def check_package_target(target: str | Path) -> Path:
    """`target`, or FileWriteError when something that is not a package is in its place or its
    directory cannot be made or written. Cheap: call it before a long compile."""
    target = Path(target)
    if (target.exists() or target.is_symlink()) and not is_package(target):
        kind = "directory" if target.is_dir() else "file"
        raise FileWriteError(f"{target} exists and is a {kind}, not an .mlpackage (no Manifest.json): anefx "
                             "does not replace it. Choose another output path, or move it away yourself.")
    _check_directory(target)
    return target


def check_file_target(target: str | Path) -> Path:
    """`target`, or FileWriteError when it is a directory or its directory cannot be made or written."""
    target = Path(target)
    if target.is_dir():
        raise FileWriteError(f"{target} is a directory; pass the path of a file, e.g. {target / 'diff.html'}.")
    _check_directory(target)
    return target


def _check_directory(target: Path) -> None:
    existing = target.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise FileWriteError(f"cannot write {target}: {existing} is a file, not a directory. Choose another "
                             "output path.")
    if not os.access(existing, os.W_OK):
        raise FileWriteError(f"cannot write {target}: {existing} is not writable. Choose a directory you can "
                             "write to.")


def atomic_package_write(target: str | Path, write_fn: Callable[[Path], Any]) -> Path:
    """Run `write_fn(staged)` to write a package into a temporary sibling of `target`, then rename it
    onto `target`. On any failure or signal, `target` is as it was and no temporary copy remains."""
    target = check_package_target(target)
    with _SignalGuard() as guard, _temp_sibling(target, guard) as temp:
        staged = temp / target.name
        _as_write_error(target, lambda: write_fn(staged))
        if not is_package(staged):
            raise FileWriteError(f"writing {target} produced no package (no Manifest.json); nothing was "
                                 "changed. Save it again.")
        _as_write_error(target, lambda: _sync_tree(staged))
        with guard.deferred():
            _as_write_error(target, lambda: _replace(staged, target, temp))
            _sync_directory(target.parent)
    return target


def check_folder_target(target: str | Path, marker: str, what: str) -> Path:
    """`target`, or FileWriteError when something other than an earlier output of this kind (a folder
    holding `marker`) is in its place, or its directory cannot be made or written."""
    target = Path(target)
    if (target.exists() or target.is_symlink()) and not (target.is_dir() and (target / marker).is_file()):
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()  # an empty folder holds nothing to lose
        else:
            kind = "directory" if target.is_dir() else "file"
            raise FileWriteError(f"{target} exists and is a {kind} that is not {what} (no {marker}): anefx does "
                                 "not replace it. Choose another output path, or move it away yourself.")
    _check_directory(target)
    return target


def atomic_folder_write(target: str | Path, write_fn: Callable[[Path], Any], marker: str, what: str) -> Path:
    """Like `atomic_package_write` for a folder of anefx's own (e.g. an LLM's chunks and manifest): written
    into a temporary sibling, `marker` checked, then swapped onto `target` in one step."""
    target = check_folder_target(target, marker, what)
    with _SignalGuard() as guard, _temp_sibling(target, guard) as temp:
        staged = temp / target.name
        _as_write_error(target, lambda: write_fn(staged))
        if not (staged / marker).is_file():
            raise FileWriteError(f"writing {target} produced no {marker}; nothing was changed. Save it again.")
        _as_write_error(target, lambda: _sync_tree(staged))
        with guard.deferred():
            _as_write_error(target, lambda: _replace(staged, target, temp))
            _sync_directory(target.parent)
    return target


def atomic_write_text(target: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to the file `target` through a temporary sibling and one rename."""
    target = check_file_target(target)
    data = text.encode("utf-8")
    with _SignalGuard() as guard, _temp_sibling(target, guard) as temp:
        staged = temp / target.name
        _as_write_error(target, lambda: _write_bytes(staged, data))
        with guard.deferred():
            _as_write_error(target, lambda: os.replace(staged, target))
            _sync_directory(target.parent)
    return target


def os_error_message(exc: OSError, target: Path | None = None) -> str:
    """One line for a file-system error: what failed, why, and what to change."""
    where = target or (Path(exc.filename) if exc.filename else None)
    reason = _reason(exc)
    advice = _ADVICE.get(exc.errno or 0, "check the path and the disk")
    subject = f"cannot write {where}" if target is not None else f"{where}" if where else "file system error"
    return f"{subject}: {reason}. To fix: {advice}."


def _reason(exc: OSError) -> str:
    if isinstance(exc, shutil.Error) and exc.args and isinstance(exc.args[0], list) and exc.args[0]:
        return str(exc.args[0][0][-1])  # copytree collects (src, dst, reason) per file: the first says it
    return exc.strerror or str(exc) or type(exc).__name__


def _as_write_error(target: Path, step: Callable[[], Any]) -> Any:
    try:
        return step()
    except OSError as exc:
        suffix = " Nothing at that path was changed."
        raise FileWriteError(os_error_message(exc, target) + suffix) from exc


@contextlib.contextmanager
def _temp_sibling(target: Path, guard: _SignalGuard) -> Iterator[Path]:
    """A new hidden directory next to `target`, removed (with whatever is in it) on the way out."""
    def make() -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent))

    temp = _as_write_error(target, make)
    try:
        yield temp
    finally:
        with guard.deferred():
            shutil.rmtree(temp, ignore_errors=True)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def _sync_tree(root: Path) -> None:
    """Flush every file under `root` to disk, so the renamed package is complete even after a crash."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _sync_directory(Path(folder))


def _sync_directory(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every OS / file system can fsync a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _replace(staged: Path, target: Path, trash: Path, exchange: bool = True) -> None:
    """Put `staged` at `target`; an old package there ends up in `trash`. The last writer wins."""
    for attempt in range(_REPLACE_ATTEMPTS):
        if exchange and _exchange(staged, target):  # target never missing: the old one is now at staged
            return
        try:
            os.rename(staged, target)
            return
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        with contextlib.suppress(FileNotFoundError):  # another writer may have moved it already
            os.rename(target, trash / f"previous-{attempt}")
    raise FileWriteError(f"{target} kept changing while anefx replaced it (other processes are writing it); "
                         "write to another path, or try again when they are done.")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step. False when `b` does not exist or the OS or file system cannot."""
    swap = _exchange_call()
    if swap is None:
        return False
    if swap(os.fsencode(a), os.fsencode(b)) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOENT, errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


@functools.cache
def _exchange_call() -> Callable[[bytes, bytes], int] | None:
    """Linux renameat2(RENAME_EXCHANGE) or macOS renamex_np(RENAME_SWAP), through the C library."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        call = libc.renameat2
        call.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        return lambda a, b: call(-100, a, -100, b, 2)  # AT_FDCWD, RENAME_EXCHANGE
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        call = libc.renamex_np
        call.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        return lambda a, b: call(a, b, 2)  # RENAME_SWAP
    return None


class _SignalGuard:
    """While writing, SIGTERM/SIGINT raise WriteInterrupted where the write is, so it unwinds and cleans
    up; inside `deferred()` (the rename, the cleanup) they wait. On exit the previous handlers are back
    and a signal that arrived is delivered to them (SIGTERM's default then ends the process).
    Handlers can only be set in the main thread; elsewhere the write is still atomic, signals unhandled."""

    def __init__(self) -> None:
        self.pending: int | None = None
        self.deferring = 0
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for signum in _SIGNALS:
                handler = signal.getsignal(signum)
                if handler not in (signal.SIG_IGN, None):  # None: set outside Python, cannot be restored
                    self.previous[signum] = handler
                    signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        first = self.pending is None
        self.pending = self.pending or signum
        if first and not self.deferring:
            raise WriteInterrupted(signum)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self.deferring += 1
        try:
            yield
        finally:
            self.deferring -= 1

    def __exit__(self, kind: Any, exc: BaseException | None, traceback: Any) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        if self.pending is not None:
            signal.raise_signal(self.pending)  # the previous handler acts: exits, or raises KeyboardInterrupt
            if isinstance(exc, WriteInterrupted):  # it returned: the write was abandoned, say so
                name = signal.Signals(self.pending).name
                raise FileWriteError(f"writing was interrupted by {name}; nothing was changed at the "
                                     "target path. Write it again.") from None
