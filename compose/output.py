"""The output protocol: how a build takes its `-o` folder without ever losing what a user had there.

- `-o` is made absolute before the spec runs (a spec that changes directory changes nothing).
- An exclusive lock (`.OUT.compose-lock` beside it, flock) is held for the whole build: a second build to
  the same folder fails at once.
- The build is written into `.OUT.compose-tmp-PID` and renamed into place. At rename time nothing is
  replaced that was not there, and checked, at the start: a folder that appears during the build, or one
  swapped for another, is left alone and the build fails.
- Interrupted builds (SIGINT, SIGTERM, SIGHUP) remove what they wrote; what a kill -9 leaves is removed by
  the next build to the same folder, which holds the lock and so knows no live build owns it.
- `-o` names a folder or nothing: never the current directory or one that holds it, `/`, the home
  directory, a symlink, a file, a device, a FIFO or a socket (as root, renaming /dev/null away breaks the
  machine). `--force` replaces only a folder that is empty or that compose wrote (it holds compose's own
  record file).
- Commands that read or add to an existing build (export, generate, verify) take the same lock: export
  exclusively, the readers shared, so a build cannot replace the folder under them.
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
    """`out` as an absolute path, its parent's symlinks resolved (the folder itself is not followed: a
    symlink there is refused when the folder is taken). Refuses what no build may ever replace."""
    text = os.fspath(out)
    if not str(text).strip():  # an unset $OUT: taken as is, it would be the current directory
        raise BuildError("-o: empty; name the output folder")
    p = Path(os.path.abspath(os.path.expanduser(text)))
    if p.name in ("", ".", ".."):
        raise BuildError(f"-o {out}: not a folder name")
    p = _resolve_parent(p.parent) / p.name
    here = Path.cwd().resolve()
    if p == here or p in here.parents:
        what = "is the current directory" if p == here else f"holds the current directory {here}"
        raise BuildError(f"-o {out}: {what}; name a folder of its own for the output")
    home = Path.home().resolve()
    if p == home:
        raise BuildError(f"-o {out}: is the home directory; name a folder of its own for the output")
    return p


def _resolve_parent(parent: Path) -> Path:
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return existing.resolve() / parent.relative_to(existing)


_KINDS = {stat.S_IFLNK: "a symbolic link", stat.S_IFREG: "a file", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket"}


def check_replaceable(out: Path, identity: tuple | None, force: bool, marker: str) -> None:
    """Refuse, with or without --force, anything at `out` but a folder; with --force, a folder that is
    neither empty nor written by compose (holding `marker`); without it, any folder at all."""
    if identity is None:
        return
    kind = identity[2]
    if kind != stat.S_IFDIR:
        what = _KINDS.get(kind, "not a folder")
        raise BuildError(f"-o {out}: is {what}, not a folder; compose writes only to a folder of its own"
                         + (" (it never follows or replaces a link)" if kind == stat.S_IFLNK else ""))
    if not force:
        raise BuildError(f"{out} already exists; pass --force to replace it")
    try:
        names = os.listdir(out)
    except OSError as e:
        raise BuildError(f"-o {out}: cannot read the folder ({e.strerror})") from None
    if names and marker not in names:
        raise BuildError(f"-o {out}: --force replaces only an empty folder or one compose wrote (holding {marker}); "
                         "this one holds other files")


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

    def __init__(self, out: Path, force: bool, marker: str = "compose.json"):
        self.out, self.force, self.marker = out, force, marker
        self.lock_path = _lock_path(out)
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
            check_replaceable(self.out, self.before, self.force, self.marker)
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
        self.lock_fd = _take_lock(self.out, self.lock_path, exclusive=True)

    def _remove_stale(self) -> None:
        """Remove the temporary and old folders of earlier builds to this folder: with the lock held, no
        live build owns them (a kill -9 or a power cut left them)."""
        pattern = re.compile(rf"\.{re.escape(self.out.name)}\.compose-(tmp|old|export)-\d+")
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
            _release_lock(self.lock_fd, self.lock_path)
            self.lock_fd = None
        for p in reversed(self.created):
            try:
                p.rmdir()  # only if still empty: never remove what someone else put there
            except OSError:
                break
        for s, handler in self._signals.items():
            signal.signal(s, handler)
        self._signals = {}


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.compose-lock"


def _take_lock(out: Path, lock_path: Path, *, exclusive: bool) -> int:
    """flock on `lock_path` (created if missing): exclusive for a writer (build, export), shared for a
    reader (generate, verify). Fails at once, never waits, if a writer holds it, or readers for a writer."""
    import fcntl

    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise BuildError(f"{out.parent}: cannot write there ({e.strerror})") from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            also = ", or a command is reading it" if exclusive else ""
            raise BuildError(f"{out}: another compose build is writing this folder now{also} (it holds "
                             f"{lock_path.name}); wait for it, or choose another folder") from None
        # The holder before us may have unlinked the file after we opened it: then our lock guards
        # nothing, so take the one at the path now.
        if _same_file(fd, lock_path):
            if exclusive:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def _release_lock(fd: int, lock_path: Path) -> None:
    """Unlock, removing the lock file when nobody else holds it: a reader upgrades to exclusive first (it
    fails while another reader holds it, who then removes the file in turn)."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if _same_file(fd, lock_path):
            os.unlink(lock_path)
    except BlockingIOError:
        pass
    finally:
        os.close(fd)  # releases the flock


class FolderLock:
    """The build lock on an existing build folder, for the commands that add to it (exclusive) or read it
    (shared): `with FolderLock(folder, exclusive=True): ...`. A folder given through a symlink is locked
    under its real name, which is the name its build locked."""

    def __init__(self, folder: Path, *, exclusive: bool):
        self.folder = Path(folder).resolve()
        self.exclusive = exclusive
        self.fd: int | None = None

    def __enter__(self) -> Path:
        if not self.folder.is_dir():
            raise BuildError(f"{self.folder}: no such build folder")
        self.fd = _take_lock(self.folder, _lock_path(self.folder), exclusive=self.exclusive)
        if self.exclusive:  # no live compose owns a temporary file now: a kill -9 left it (replace_file)
            for p in self.folder.glob(".*.compose-tmp"):
                _remove(p)
        return self.folder

    def __exit__(self, *exc) -> bool:
        if self.fd is not None:
            _release_lock(self.fd, _lock_path(self.folder))
            self.fd = None
        return False


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


def replace_file(folder: Path, name: str, data: bytes) -> None:
    """`folder/name` replaced in one rename by `data`, first written under a fresh name in the folder
    (mkstemp: O_EXCL|O_NOFOLLOW, so never through a link someone left there). A reader sees the old file or
    the new one; a link at `name` is itself replaced, never followed."""
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".compose-tmp", dir=folder)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, folder / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Staging:
    """A fresh folder beside a build folder, for files an export writes and checks before they join the
    build: `publish(names)` moves them in, each in one rename (replacing, never following, what is there).
    Whatever happens before that, the build folder is as it was; the staging folder is always removed.
    Take it under the folder's exclusive lock (FolderLock), which also makes what a kill -9 left stale."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder.parent / f".{self.folder.name}.compose-export-{os.getpid()}"

    def __enter__(self) -> "Staging":
        if os.path.lexists(self.path):  # a kill -9's, with this pid reused: under the lock, nobody owns it
            _remove(self.path)
        self.path.mkdir(mode=0o700)
        return self

    def publish(self, names: list[str]) -> None:
        for name in names:
            if Path(name).name != name:
                raise BuildError(f"{self.folder}: an export named the file {name!r}, not a plain name")
            os.replace(self.path / name, self.folder / name)

    def __exit__(self, *exc) -> bool:
        _remove(self.path)
        return False
