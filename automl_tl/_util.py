"""Small helpers several modules share, written once: atomic writes, the node lock, process
liveness, out-of-memory classification and the first line of an exception.

Private: nothing here is public API, and nothing here imports the rest of the package.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger("automl_tl")


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file's content, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def as_umask_allows(path: str | Path) -> None:
    """Give ``path`` (a folder: and all below it) the mode a plain ``open`` / ``mkdir`` would.

    Temporary files and folders are private (``mkstemp``: 0600, ``mkdtemp``: 0700); a model,
    weights or a report written through them must be readable by whoever reads the study
    folder (a serving container, a colleague) as any other file there.
    """
    umask = os.umask(0o022)
    os.umask(umask)
    path = Path(path)
    if path.is_dir():
        for below in sorted(path.rglob("*")):
            os.chmod(below, (0o777 if below.is_dir() else 0o666) & ~umask)
        os.chmod(path, 0o777 & ~umask)
    else:
        os.chmod(path, 0o666 & ~umask)


def write_atomic(path: str | Path, write: Callable[[str], object] | str | bytes) -> None:
    """Write ``path`` through a private temporary file in its folder and one rename, so a
    reader never sees half a file and a kill leaves the old one.

    ``write`` is the content (``str`` as UTF-8, or ``bytes``), or a function given the
    temporary path to write (e.g. ``safetensors.torch.save_file``). The file ends with the
    mode a plain ``open`` would give it, and its data is on disk before the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if callable(write):
            os.close(fd)
            write(tmp)
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(write.encode("utf-8") if isinstance(write, str) else write)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        as_umask_allows(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def node_lock(
    lock_path: str | Path, waiting: str | None = None, *, block: bool = True
) -> Iterator[None]:
    """One process of this node at a time (``flock``; released even when the holder is
    killed). ``waiting`` is logged when another process holds the lock; with ``block=False``
    that raises ``BlockingIOError`` instead of waiting."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock; atomic renames keep files whole
        yield
        return
    # never through a symbolic link planted at the lock's (predictable) name
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    with os.fdopen(fd, "r+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not block:
                raise
            if waiting:
                log.info("%s", waiting)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of a process from /proc, or None if there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = text.rsplit(")", 1)[1].split()
    return rest[0], int(rest[19])


def pid_alive(pid: int, started: int | None = None) -> bool:
    """Whether process ``pid`` of this host runs (a zombie does not). With ``started`` (its
    start time from :func:`proc_stat`), a reused pid of another process does not count."""
    if pid <= 0:
        return True
    if Path("/proc/self/stat").exists():
        stat = proc_stat(pid)
        if stat is None or stat[0] in ("Z", "X"):  # gone, or a zombie nobody reaped yet
            return False
        return started in (None, stat[1])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, as another user
        return True
    return True


def is_out_of_memory(exc: BaseException | None) -> bool:
    """An out-of-memory failure on any device: ``MemoryError`` (host), torch's
    ``OutOfMemoryError`` (CUDA, MPS), or a runtime error that says so (a failed host or
    cuBLAS/cuDNN allocation)."""
    if exc is None:
        return False
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        s in text
        for s in (
            "out of memory",
            "can't allocate memory",
            "cublas_status_alloc_failed",
            "cudnn_status_alloc_failed",
        )
    )


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (or the type alone), for one-line reasons."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def failure_reason(exc: BaseException) -> str:
    """Why a trial failed, in one line; out-of-memory says so first."""
    reason = first_line(exc)
    return f"out of memory: {reason}" if is_out_of_memory(exc) else reason


#: filesystems shared between hosts, where SQLite's WAL mode (and often its locking) fails
NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "lustre",
        "gpfs",
        "beegfs",
        "glusterfs",
        "fuse.glusterfs",
        "ceph",
        "fuse.ceph",
        "fuse.sshfs",
        "9p",
        "afs",
        "ocfs2",
        "gfs2",
        "fuse.juicefs",
        "wekafs",
    }
)


def filesystem_type(path: str | Path, mounts: str | None = None) -> str | None:
    """The filesystem type of the mount that holds ``path`` (``/proc/self/mounts``; the
    longest mount point that contains it), or None where that cannot be read."""
    if mounts is None:
        try:
            mounts = Path("/proc/self/mounts").read_text()
        except OSError:
            return None
    target = Path(path).resolve()
    best, kind = -1, None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = Path(fields[1].replace("\\040", " "))
        if (target == point or point in target.parents) and len(point.parts) > best:
            best, kind = len(point.parts), fields[2]
    return kind
