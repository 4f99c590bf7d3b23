"""The output protocol: how a build takes its `-o` folder without ever losing what a user had there.

- `-o` is made absolute before the spec runs (a spec that changes directory changes nothing).
- An exclusive lock (`.OUT.compose-lock` beside it, flock) is held for the whole build: a second build to
  the same folder fails at once.
- The build is written into `.OUT.compose-tmp-PID` and renamed into place. At rename time nothing is
  replaced that was not there, and checked, at the start: a folder that appears during the build, or one
  swapped for another, is left alone and the build fails.
- Interrupted builds (SIGINT, SIGTERM, SIGHUP) remove what they wrote; what a kill -9 leaves is removed by
  the next build to the same folder, which holds the lock and so knows no live build owns it.
"""
from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import signal
import stat
import sys
import threading
from pathlib import Path

from compose.errors import BuildError


def absolute(out: str | os.PathLike) -> Path:
    """`out` as an absolute path, its parent's symlinks resolved (the folder itself may be a symlink that
    --force replaces, never follows)."""
    p = Path(os.path.abspath(os.path.expanduser(os.fspath(out))))
    if p.name in ("", ".", ".."):
        raise BuildError(f"-o {out}: not a folder name")
    return _resolve_parent(p.parent) / p.name


def _resolve_parent(parent: Path) -> Path:
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return existing.resolve() / parent.relative_to(existing)


def _identity(p: Path) -> tuple | None:
    """What is at `p` (not following a symlink): None, or (device, inode, type)."""
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, stat.S_IFMT(st.st_mode)


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C so every cleanup path that handles one handles the others."""


class OutputFolder:
    """The build's hold on its output folder: enter before any work, `commit()` when the build is complete.

    On leaving without a commit (an error, an interrupt), everything written is removed: the temporary
    folder and the parent folders the build created.
    """

    def __init__(self, out: Path, force: bool):
        self.out, self.force = out, force
        self.lock_path = out.parent / f".{out.name}.compose-lock"
        self.tmp = out.parent / f".{out.name}.compose-tmp-{os.getpid()}"
        self.created: list[Path] = []
        self.lock_fd: int | None = None
        self.before: tuple | None = None
        self._signals: dict = {}

    def __enter__(self) -> "OutputFolder":
        try:
            self._trap_signals()  # first: a SIGTERM from here on cleans up like Ctrl-C
            self._make_parents()
            self._lock()
            self.before = _identity(self.out)
            if self.before is not None and not self.force:
                raise BuildError(f"{self.out} already exists; pass --force to replace it")
            self._remove_stale()
            self.tmp.mkdir()
        except BaseException:
            self._cleanup()
            raise
        return self

    def __exit__(self, *exc) -> bool:
        self._cleanup()
        return False

    # -- taking the folder -----------------------------------------------------------------------------

    def _make_parents(self) -> None:
        missing = []
        p = self.out.parent
        while not p.exists():
            missing.append(p)
            p = p.parent
        for p in reversed(missing):
            try:
                p.mkdir()
            except OSError as e:
                raise BuildError(f"{p}: cannot create the output's parent folder ({e.strerror})") from None
            self.created.append(p)

    def _lock(self) -> None:
        import fcntl

        while True:
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise BuildError(f"{self.out.parent}: cannot write there ({e.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise BuildError(f"{self.out}: another compose build is writing this folder now "
                                 f"(it holds {self.lock_path.name}); wait for it or choose another -o") from None
            # The holder before us may have unlinked the file after we opened it: then our lock guards
            # nothing, so take the one at the path now.
            if _same_file(fd, self.lock_path):
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self.lock_fd = fd
                return
            os.close(fd)

    def _remove_stale(self) -> None:
        """Remove the temporary and old folders of earlier builds to this folder: with the lock held, no
        live build owns them (a kill -9 or a power cut left them)."""
        pattern = re.compile(rf"\.{re.escape(self.out.name)}\.compose-(tmp|old)-\d+")
        for p in [p for p in self.out.parent.iterdir() if pattern.fullmatch(p.name)]:
            _remove(p)
            print(f"compose: removed {p}, left by an interrupted build", file=sys.stderr)

    def _trap_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def interrupted(signum, _frame):
            raise Interrupted(f"stopped by {signal.Signals(signum).name}")

        for s in (signal.SIGTERM, signal.SIGHUP):
            self._signals[s] = signal.signal(s, interrupted)

    # -- giving it back --------------------------------------------------------------------------------

    def commit(self) -> None:
        """Rename the finished build into place, replacing only what was there and checked at the start."""
        now = _identity(self.out)
        if now != self.before:
            what = "appeared" if self.before is None else "was replaced by something else" if now else "vanished"
            raise BuildError(f"{self.out} {what} during the build; nothing was replaced (the build is discarded)")
        old = None
        if now is not None:
            old = self.out.parent / f".{self.out.name}.compose-old-{os.getpid()}"
            os.rename(self.out, old)
        try:
            _rename_noreplace(self.tmp, self.out)
        except BaseException:
            if old is not None:
                os.rename(old, self.out)
            raise
        self.created = []  # they hold the output now
        if old is not None:
            _remove(old)

    def _cleanup(self) -> None:
        if self.tmp.exists():
            _remove(self.tmp)
        if self.lock_fd is not None:
            if _same_file(self.lock_fd, self.lock_path):
                os.unlink(self.lock_path)
            os.close(self.lock_fd)  # releases the flock
            self.lock_fd = None
        for p in reversed(self.created):
            try:
                p.rmdir()  # only if still empty: never remove what someone else put there
            except OSError:
                break
        for s, handler in self._signals.items():
            signal.signal(s, handler)
        self._signals = {}


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


_RENAME_NOREPLACE = 1


def _rename_noreplace(src: Path, dst: Path) -> None:
    """rename(2) that fails if `dst` exists (Linux renameat2 RENAME_NOREPLACE). Where the call is missing,
    a check and a plain rename, which a plain rename of a folder onto a non-empty one also refuses."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        at_fdcwd = -100
        if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):
            raise BuildError(f"{dst}: cannot move the build into place ({os.strerror(err)})")
    if os.path.lexists(dst):
        raise BuildError(f"{dst} appeared during the build; nothing was replaced (the build is discarded)")
    os.rename(src, dst)
