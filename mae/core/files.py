"""The file layer every command shares: atomic writes, checksums, file-system faults as messages, locks, leftovers.

Torch-free and numpy-free (stdlib only), so the runtime, export and training all write through it.

- **Faults.** `fault(exc, path, action)` turns an `OSError` (no space, quota, read-only, permission, not a
  directory, is a file, I/O error, name too long) into a `FileSystemFault`: an `MAEError` naming the path, the
  cause and the remedy. `atomic_write` and `make_dirs` raise it; `faults(path, action)` wraps any other writer.
- **Atomic writes.** `atomic_write(path, write)`: a temporary file beside `path`, fsync, rename, fsync of the folder.
  A kill or a full disk never leaves a half-written file under `path`; readers see the old one or the new one.
- **Owner-tagged temporaries.** Every temporary is named `.NAME.OWNER.RANDOM.tmp` (files) or
  `.NAME.OWNER.RANDOM.<kind>` (folders), where OWNER is `host-pid`. `remove_leftovers` deletes only temporaries
  whose owner is a dead process on this host (and untagged ones from older versions), never those of a live run,
  so two runs in one folder cannot destroy each other's work.
- **Checksums.** `sha256_file` hashes a file; `cached_sha256` remembers the hash of a file under
  `$MAE_CACHE_DIR/sha256/`, keyed by its device, inode, size, mtime and ctime, so opening a large graph again costs
  a `stat` (a copy over it, even one that keeps the mtime, changes the ctime and is hashed again).
- **Locks.** `FolderLock`: an exclusive `flock` on a lock file, released by the kernel when its process dies
  (even by SIGKILL), so a lock is never stale; the second run is told who holds it. The file is removed on release
  (a killed holder leaves an empty one, which the next run simply locks).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from .errors import MAEError

# errno -> (cause, remedy). The remedy says what to do; the path is named by the message itself.
_CAUSES: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on the device", "free space there (or write elsewhere), then run the same again"),
    errno.EDQUOT: ("the disk quota is exhausted", "free space within your quota (or write elsewhere), then rerun"),
    errno.EROFS: ("the file system is read-only", "choose a writable location"),
    errno.EACCES: ("permission denied", "choose a location you may write to, or fix its permissions"),
    errno.EPERM: ("the operation is not permitted", "choose a location you may write to, or fix its permissions"),
    errno.ENOTDIR: ("a file stands where a folder is needed", "remove or rename that file, or choose another path"),
    errno.EEXIST: ("a file stands where a folder is needed", "remove or rename that file, or choose another path"),
    errno.EISDIR: ("a folder stands where a file is needed", "remove or rename that folder, or choose another path"),
    errno.EIO: ("an input/output error (a failing disk, a lost network mount)", "check the device, then rerun"),
    errno.ENAMETOOLONG: ("the file name is too long", "choose a shorter path"),
    errno.ENOENT: ("it does not exist (or a folder on its path does not)", "check the path"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n) or use fewer workers"),
}
_SHORT_WRITE = "requested and"  # numpy's writer: "OSError: 249600 requested and 26592 written" (no errno)


class FileSystemFault(MAEError):
    """An operating-system fault while reading or writing `path`."""

    def __init__(self, message: str, hint: str, path: Path, errno_: int | None) -> None:
        super().__init__(message, hint=hint)
        self.path = path
        self.errno = errno_


def fault(exc: OSError, path: str | os.PathLike | None = None, action: str = "write") -> FileSystemFault:
    """`exc` as a `FileSystemFault` that names the path, the cause and the remedy."""
    if isinstance(exc, FileSystemFault):
        return exc
    where = Path(path if path is not None else (exc.filename or "?"))
    code = exc.errno
    if code is None and _SHORT_WRITE in str(exc):
        code = errno.ENOSPC  # a short write: the device is full
    cause, remedy = _CAUSES.get(code, (exc.strerror or str(exc), "check the path and the device, then run it again"))
    if code == errno.ENOSPC:
        free = free_bytes(where)
        if free is not None:
            cause += f" ({_size(free)} free)"
    return FileSystemFault(f"Cannot {action} {where}: {cause}.", hint=remedy, path=where, errno_=code)


@contextlib.contextmanager
def faults(path: str | os.PathLike, action: str = "write") -> Iterator[None]:
    """Turn an `OSError` raised inside the block into a `FileSystemFault` about `path`."""
    try:
        yield
    except FileSystemFault:
        raise
    except OSError as exc:
        raise fault(exc, path if exc.filename is None else exc.filename, action) from exc


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes on the file system holding `path` (or its nearest existing parent); None if unknown."""
    probe = Path(path)
    for candidate in (probe, *probe.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError


def size_text(count: float) -> str:
    """Bytes as a short human text ("3.2 GiB")."""
    return _size(count)


def make_dirs(path: str | os.PathLike) -> Path:
    """`mkdir -p` whose faults are messages (e.g. an existing file where the folder should be)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileSystemFault(
            f"Cannot create the folder {path}: a file of that name exists.",
            hint="remove or rename that file, or choose another path",
            path=path,
            errno_=errno.EEXIST,
        )
    with faults(path, "create the folder"):
        path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------------------------- temporaries
def owner_tag() -> str:
    """`host-pid` of this process; dots and dashes in the host name are replaced so the tag parses back."""
    host = socket.gethostname().replace(".", "_").replace("-", "_") or "localhost"
    return f"{host}-{os.getpid()}"


def temporary_name(name: str, kind: str = "tmp") -> tuple[str, str]:
    """(prefix, suffix) for tempfile.mkstemp/mkdtemp: `.NAME.OWNER.` and `.KIND`."""
    return f".{name}.{owner_tag()}.", f".{kind}"


def _temporary_of(entry: str, names: set[str], kind: str) -> tuple[str, str] | None:
    """(name, owner tag) if `entry` is a temporary of one of `names`: owner "" when untagged (older versions)."""
    tail = f".{kind}"
    if not (entry.startswith(".") and entry.endswith(tail)):
        return None
    middle = entry[1 : -len(tail)]  # NAME.OWNER.RANDOM (tagged), NAME.RANDOM or NAME (older versions, untagged)
    if middle in names:
        return middle, ""
    tagged = middle.rsplit(".", 2)
    if len(tagged) == 3 and "-" in tagged[1] and tagged[0] in names:
        return tagged[0], tagged[1]
    untagged = middle.rsplit(".", 1)
    if len(untagged) == 2 and untagged[0] in names:
        return untagged[0], ""
    return None


def owner_alive(owner: str) -> bool:
    """Whether the process tagged `owner` may still run: another host's process counts as alive."""
    host, _, pid = owner.rpartition("-")
    if not pid.isdigit() or host != owner_tag().rpartition("-")[0]:
        return bool(owner)  # untagged (""): from an older version, treated as dead
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return True
    return True


def remove_leftovers(folder: str | os.PathLike, names: Iterator[str] | list[str] | set[str], kind: str = "tmp") -> int:
    """Remove temporaries of `names` in `folder` that a dead process left (files, or folders for other kinds).

    Never one of a live process: two runs in one folder cannot delete each other's work. Returns the count.
    """
    folder = Path(folder)
    wanted = set(names)
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:  # one pass over the folder, whatever the number of names
        found = _temporary_of(entry.name, wanted, kind)
        if found is None or owner_alive(found[1]):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
            removed += 1
        except OSError:  # gone already, or not ours to remove after all
            continue
    return removed


# ------------------------------------------------------------------------------------------------ writing
def current_umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None], action: str = "write") -> None:
    """`write(handle)` into an owner-tagged temporary beside `path`, fsync, rename over `path`, fsync the folder.

    Never a half-written file under `path`, even after a kill or a full disk: readers see the old file or the
    whole new one. An `OSError` becomes a `FileSystemFault` naming `path`; the temporary is removed.
    """
    path = Path(path)
    make_dirs(path.parent)
    prefix, suffix = temporary_name(path.name)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
        try:
            os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; the result should look like any new file
            with os.fdopen(fd, "wb") as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except FileSystemFault:
        raise
    except OSError as exc:  # named after the file being written, never its temporary
        raise fault(exc, path, action) from exc
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copy `source` to `target` atomically (temporary + fsync + rename)."""
    with faults(source, "read"), open(source, "rb") as handle:
        atomic_write(target, lambda out: shutil.copyfileobj(handle, out, 1 << 20))


# ---------------------------------------------------------------------------------------------- checksums
def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    """$MAE_CACHE_DIR, else $XDG_CACHE_HOME/mae, else ~/.cache/mae."""
    explicit = os.environ.get("MAE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mae"


def _stat_key(stat: os.stat_result) -> dict[str, int]:
    return {
        "dev": stat.st_dev,
        "ino": stat.st_ino,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "ctime_ns": stat.st_ctime_ns,
    }


def cached_sha256(path: str | os.PathLike, fresh: bool = False) -> str:
    """sha256 of `path`, remembered by (device, inode, size, mtime, ctime); `fresh=True` always hashes.

    The cache is an optimization only: an unreadable or unwritable cache means the file is hashed.
    """
    path = Path(path)
    with faults(path, "read"):
        stat = path.stat()
    key = _stat_key(stat)
    entry_path = cache_dir() / "sha256" / (hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32] + ".json")
    if not fresh:
        try:
            entry = json.loads(entry_path.read_text())
            if entry.get("stat") == key and isinstance(entry.get("sha256"), str):
                return entry["sha256"]
        except (OSError, ValueError, AttributeError):
            pass
    with faults(path, "read"):
        digest = sha256_file(path)
    if _stat_key(path.stat()) == key:  # unchanged while it was read: worth remembering
        with contextlib.suppress(MAEError):
            atomic_write_text(entry_path, json.dumps({"path": str(path), "stat": key, "sha256": digest}) + "\n")
    return digest


# --------------------------------------------------------------------------------------------------- locks
class FolderLock:
    """An exclusive lock held while a command writes one place; the kernel drops it when the process dies.

    `FolderLock(lock_file, what).acquire()` raises an `MAEError` naming the holder when another process has it.
    Where `fcntl` does not exist (Windows) it does nothing.
    """

    def __init__(self, lock_file: str | os.PathLike, what: str, hint: str) -> None:
        self.lock_file = Path(lock_file)
        self.what = what
        self.hint = hint
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        make_dirs(self.lock_file.parent)
        while True:
            with faults(self.lock_file, "lock"):
                fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_holder(fd)
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise MAEError(f"{self.what} is in use by another mae process ({holder}).", hint=self.hint) from exc
                raise fault(exc, self.lock_file, "lock") from exc
            # The holder before us removes the file as it releases it: a lock on a removed file locks nothing.
            try:
                same = os.stat(self.lock_file).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, owner_tag().encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file, then drop the lock (in that order, so a waiting process re-checks the file)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self.lock_file.unlink()
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc_info: Any) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        owner = os.pread(fd, 256, 0).decode(errors="replace").strip()
    except OSError:
        owner = ""
    if not owner:
        return "unknown process"
    host, _, pid = owner.rpartition("-")
    return f"pid {pid} on {host}" if pid.isdigit() else owner
