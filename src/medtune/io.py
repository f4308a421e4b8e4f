"""The one place medtune writes outputs: atomic files and directories (temp name beside the target, fsync, rename), the
"refuse a non-empty output dir unless --overwrite" rule with an early writability check, the output-dir lock and
swap (a run dir belongs to one run), and the free-disk check.

A reader (or a crash) never sees half a file: the bytes go to `.NAME.tmp-<pid>` in the same directory, are flushed
to disk, and `os.replace` swaps them in (atomic on POSIX and Windows). Directories (adapters, exports, checkpoints)
are built under `.NAME.tmp-<pid>` and renamed into place; an older directory of that name is moved aside first and
deleted only after the new one is in place.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from medtune.errors import MedtuneError, TrainingInterrupted

try:
    import fcntl
except ImportError:  # Windows: msvcrt.locking instead
    fcntl = None

PROBE = "write-probe"  # claim_out_dir's writability probe (a _tmp_name of it, removed at once)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories can't be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename itself is still atomic
    finally:
        os.close(fd)


def check_file_target(path: Path, flag: str = "--out") -> Path:
    """A file medtune is to write (a report, predictions): refused unless it is new or a regular file, in a directory
    (or under a path where one can be made), with a name the file system takes. Never a device, FIFO or directory:
    the atomic rename would replace /dev/null itself."""
    path = _lexical(path)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise MedtuneError(f"{flag} {path}: is not a regular file (a directory, device, FIFO or link); medtune writes "
                           "only regular files: choose another name")
    if any(len(part.encode()) > 255 for part in path.parts):
        raise MedtuneError(f"{flag} {str(path)[:80]}...: a name in it is over 255 bytes, more than a file system takes")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise MedtuneError(f"{flag} {path}: {ancestor} is a file, so no directory can be created under it")
    return path


def write_bytes(path: Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (temp name, fsync, rename). Refuses to replace anything but a regular file."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise MedtuneError(f"{path}: is not a regular file (a directory, device or FIFO); medtune replaces only regular "
                           "files")
    path.parent.mkdir(parents=True, exist_ok=True)  # `report --out new/dir/r.html`: check_file_target allowed it
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_text(path: Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data, indent: int | None = 1) -> Path:
    return write_text(path, json.dumps(data, indent=indent, default=str, ensure_ascii=False))


def write_jsonl(path: Path, rows) -> Path:
    return write_text(path, "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows))


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield an empty temp dir beside `path`; on success fsync its files and rename it to `path` (replacing an older
    one), on any error (Ctrl-C included) delete it and re-raise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: Path, path: Path) -> None:
    """Move an existing `path` aside, rename `tmp` into place, then delete the old one."""
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    _remove(old)
    if path.exists() or path.is_symlink():
        path.rename(old)
    tmp.rename(path)
    _fsync_dir(path.parent)
    _remove(old)  # a symlink moved aside goes as a link: what it pointed to is never deleted


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read 1 MiB at a time (a multi-GB GGUF or safetensors file is never held in memory)."""
    import hashlib

    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe(path: Path, limit: int = 5) -> str:
    """`a.json, b/, ... (N entries)`: what is in a directory, for error messages."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in Path(path).iterdir())
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _lexical(path) -> Path:
    """`a/missing/..` is `a`: judged and created as the directory it names (the OS would resolve it only once
    `missing` exists, so a check of the unnormalized path saw an empty new dir while the write landed in `a`)."""
    return Path(os.path.normpath(path))


def check_out_dir(path: Path, overwrite: bool = False, flag: str = "--out", allow_existing: bool = False) -> Path:
    """Refuse an output dir that is a file, lies under a file, can't be written, or already holds something (unless
    `overwrite`, or `allow_existing` for `train --resume`); when it would be replaced or written into, refuse it if it
    or an entry in it is a symlink (medtune would change the link's target, outside --out). Creates nothing: see
    `claim_out_dir`."""
    path = _lexical(path)
    if any(len(part.encode()) > 255 for part in path.parts):
        raise MedtuneError(f"{flag} {str(path)[:80]}...: a name in it is over 255 bytes, more than a file system takes")
    if path.exists() and not path.is_dir():
        raise MedtuneError(f"{flag} {path}: is a file, not a directory; choose a directory")
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise MedtuneError(f"{flag} {path}: {ancestor} is a file, so no directory can be created under it")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise MedtuneError(f"{flag} {path}: {ancestor} is not writable; choose another output directory")
    content = _content(path)
    if content and not (overwrite or allow_existing):
        raise MedtuneError(f"{flag} {path}: already exists and is not empty ({describe(path)}); pass --overwrite to "
                           "replace the directory as a whole (everything in it), or choose a new directory")
    if content or (overwrite and path.is_symlink()):
        links = [p.name for p in content if p.is_symlink()]
        if path.is_symlink() or links:
            what = "is a symlink" if path.is_symlink() else f"holds symlinks ({', '.join(sorted(links)[:5])})"
            raise MedtuneError(f"{flag} {path}: {what}; medtune never replaces or writes through a link (that would "
                               f"change files outside {flag}). Remove the link or choose a new directory")
    return path


def _content(path: Path) -> list[Path]:
    # Another process's write probe (a rank of the same `accelerate launch` claiming the dir a moment earlier) is
    # not content: only count what is not a probe.
    probe = _tmp_name(path / PROBE).name.rsplit("-", 1)[0]  # ".write-probe.tmp", any process id
    return [p for p in path.iterdir() if not p.name.startswith(probe)] if path.is_dir() else []


def _refuse_inputs_inside(where: Path, inputs: tuple, flag: str, path: Path) -> None:
    """--overwrite replaces the dir as a whole: never when the command's own inputs (data, model, adapter) are in it."""
    for given in inputs:
        if not given or not Path(str(given)).exists():
            continue
        real_where = Path(os.path.realpath(where))  # a link to a file inside --out is an input inside it too
        if any(r == w or w in r.parents for r in (Path(os.path.abspath(str(given))), Path(os.path.realpath(str(given))))
               for w in (where, real_where)):
            raise MedtuneError(f"{flag} {path}: holds this command's input {given}; --overwrite replaces the whole "
                               "dir, so write to another --out (or move the input out first)")


@contextlib.contextmanager
def claim_out_dir(path: Path, overwrite: bool = False, flag: str = "--out",
                  allow_existing: bool = False, inputs: tuple = (), resumable: bool = False) -> Iterator[Path]:
    """Lock `path` for the command's life (`out_dir_lock`), check it again under the lock, prove it writable (a
    probe file) before any heavy work, and yield the directory the command must write into:

    - `path` itself when it is new or empty, or for `train --resume` (`allow_existing`: continued in place). If the
      body fails, what it wrote there is removed again (a full disk in `eval` left predictions.jsonl that `compare`
      then read as a finished evaluation): a failed command leaves no trace, except a `train` that wrote a checkpoint
      (`resumable`), which `--resume` continues. An empty dir the user made stays, empty.
    - with `overwrite` over a non-empty `path`, a fresh `.NAME.new-<pid>` beside it: when the body succeeds it is
      swapped in and the old run deleted (nothing of the old run is kept, so nothing stale is read back as this
      run's); when it fails (an error, Ctrl-C, a full disk) it is deleted and the old run stays whole. With
      `resumable` (`train`), a training run stopped by a signal (`TrainingInterrupted`: a checkpoint was written and
      the user told to `--resume`) is kept, and swapped in, so the resume continues it and not the old run.
    """
    path = _lexical(path)
    with out_dir_lock(path, flag) as main:
        where = Path(os.path.abspath(path))  # `.` and `..` have no name to put a sibling beside
        if main:
            _recover(where)
        check_out_dir(path, overwrite, flag, allow_existing)  # again: the dir may have changed before the lock
        swap = overwrite and not allow_existing and bool(_content(path))
        if swap and where in (Path.cwd(), *Path.cwd().parents):
            raise MedtuneError(f"{flag} {path}: is the current directory (or holds it); --overwrite replaces a run "
                               "dir as a whole, so run medtune from outside it or choose a new directory")
        if swap:
            _refuse_inputs_inside(where, inputs, flag, path)
        target = where.with_name(f".{where.name}.new-{_launch_id()}") if swap else path
        created = not target.exists()
        owned = swap or (not allow_existing and not _content(target))  # nothing in it is older than this command
        try:
            target.mkdir(parents=True, exist_ok=True)
            probe = _tmp_name(target / PROBE)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise MedtuneError(f"{flag} {path}: can't write there ({e.strerror or e})") from None
        try:
            yield target
        except BaseException as e:
            if isinstance(e, TrainingInterrupted) and resumable:  # `train`: the checkpoint is what --resume continues
                if swap and main:
                    replace_dir(target, where)
                    raise TrainingInterrupted(str(e).replace(str(target), str(path)), e.exit_code) from None
                raise
            kept = resumable and any((target / "checkpoints").glob("step-*"))  # train's checkpoints: --resume
            if main and owned and not kept and target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)  # a failed command leaves nothing of itself
                if not created and not swap:
                    target.mkdir(exist_ok=True)  # the empty dir the user made stays
            raise
        if swap and main:
            replace_dir(target, where)


def _recover(path: Path) -> None:
    """Under the lock, clear what a killed medtune left beside `path`: its half-built `.NAME.new-*`/`.NAME.tmp-*`
    dirs, and an old run moved aside (`.NAME.old-*`) - put back if the kill came between the two renames of a swap
    (so `path` is missing), else deleted."""
    prefix = f".{path.name}."
    own = f"{prefix}new-{_launch_id()}"
    for p in path.parent.glob(glob.escape(prefix) + "*"):
        kind = p.name[len(prefix):].split("-", 1)[0]
        if kind in ("new", "tmp") and p.name != own and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif kind == "old":
            if not path.exists() and not path.is_symlink() and p.is_dir() and not p.is_symlink():
                p.rename(path)
            else:
                _remove(p)


def _remove(p: Path) -> None:
    """Delete a dir, or only the link when it is a symlink (never what it points to)."""
    if p.is_symlink() or p.is_file():
        p.unlink(missing_ok=True)
    else:
        shutil.rmtree(p, ignore_errors=True)


def _launch_id() -> int:
    """The ranks of one `accelerate launch`/torchrun are one run: they share their launcher (the parent process)."""
    return os.getppid() if _world_size() > 1 else os.getpid()


def _world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


@contextlib.contextmanager
def out_dir_lock(path: Path, flag: str = "--out") -> Iterator[bool]:
    """Hold an exclusive lock on output dir `path` for the body: a second medtune on the same dir is refused at once
    with one line naming the process that holds it. The lock is `flock` on `.NAME.lock` beside the dir (not in it:
    it is no content of the run, and it outlives the swap of `claim_out_dir`); the file is removed on release.
    Yields True in the process that owns the dir's cleanup and swap (rank 0 of a launch; the only process otherwise):
    the other ranks of the same launch share the lock of the rank that took it."""
    real = Path(path).resolve()  # a symlinked --out and its target are one dir
    lock = real.with_name(f".{real.name}.lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MedtuneError(f"{flag} {path}: can't create {lock.parent} ({e.strerror or e})") from None
    main = _world_size() <= 1 or os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"
    fd = _acquire(lock, path, flag)
    try:
        yield main
    finally:
        if fd is not None:
            if fcntl is not None:  # (Windows can't remove an open file; there the lock file stays)
                lock.unlink(missing_ok=True)  # while still held: a process that opened the old file sees it is gone
            os.close(fd)


def _acquire(lock: Path, path: Path, flag: str) -> int | None:
    """The lock file's descriptor, locked; None when another rank of this launch holds it."""
    holder = None
    for _ in range(100):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise MedtuneError(f"{flag} {path}: can't write its lock file {lock} ({e.strerror or e}); medtune needs "
                               "to write beside the output dir: choose one inside a writable directory") from None
        if _try_lock(fd):
            try:
                same = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else its holder removed it between our open and our lock: take the new file
                os.ftruncate(fd, 0)
                os.write(fd, json.dumps({"pid": os.getpid(), "launch": _launch_id()}).encode())
                return fd
            os.close(fd)
            continue
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            holder = json.loads(os.read(fd, 256) or b"null")
        except (OSError, ValueError):
            holder = None
        os.close(fd)
        if isinstance(holder, dict):
            if _world_size() > 1 and holder.get("launch") == _launch_id():
                return None
            break
        time.sleep(0.01)  # locked, but its holder has not written its pid yet
    pid = holder.get("pid", "unknown") if isinstance(holder, dict) else "unknown"
    raise MedtuneError(f"{flag} {path}: is in use by another medtune process (pid {pid}); wait for it to finish "
                       f"or use another {flag}")


def _try_lock(fd: int) -> bool:
    if fcntl is None:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise
    return True


def check_free_space(path: Path, need: int, what: str) -> None:
    """Refuse to start writing `what` (about `need` bytes) when the filesystem holding `path` has less free space,
    with 10% + 64 MiB headroom; the message gives both numbers."""
    where = Path(path)
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    want = int(need * 1.1) + (64 << 20)
    if free < want:
        raise MedtuneError(f"not enough disk space for {what} under {where}: needs about {_size(want)} "
                           f"(including headroom), {_size(free)} free. Free some space or choose another directory")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
