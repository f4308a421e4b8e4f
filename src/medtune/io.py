"""The one place medtune writes outputs: atomic files and directories (temp name beside the target, fsync, rename), the
"refuse a non-empty output dir unless --overwrite" rule with an early writability check, and the free-disk check.

A reader (or a crash) never sees half a file: the bytes go to `.NAME.tmp-<pid>` in the same directory, are flushed
to disk, and `os.replace` swaps them in (atomic on POSIX and Windows). Directories (adapters, exports, checkpoints)
are built under `.NAME.tmp-<pid>` and renamed into place; an older directory of that name is moved aside first and
deleted only after the new one is in place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from medtune.errors import MedtuneError

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


def write_bytes(path: Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (temp name, fsync, rename)."""
    path = Path(path)
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
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def describe(path: Path, limit: int = 5) -> str:
    """`a.json, b/, ... (N entries)`: what is in a directory, for error messages."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in Path(path).iterdir())
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_out_dir(path: Path, overwrite: bool = False, flag: str = "--out", allow_existing: bool = False) -> Path:
    """Refuse an output dir that is a file, lies under a file, can't be written, or already holds something (unless
    `overwrite`, or `allow_existing` for `train --resume`). Creates nothing: see `claim_out_dir`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MedtuneError(f"{flag} {path}: is a file, not a directory; choose a directory")
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise MedtuneError(f"{flag} {path}: {ancestor} is a file, so no directory can be created under it")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise MedtuneError(f"{flag} {path}: {ancestor} is not writable; choose another output directory")
    # Another process's write probe (a rank of the same `accelerate launch` claiming the dir a moment earlier) is
    # not content: only count what is not a probe.
    probe = _tmp_name(path / PROBE).name.rsplit("-", 1)[0]  # ".write-probe.tmp", any process id
    content = path.is_dir() and any(not p.name.startswith(probe) for p in path.iterdir())
    if content and not (overwrite or allow_existing):
        raise MedtuneError(f"{flag} {path}: already exists and is not empty ({describe(path)}); pass --overwrite to "
                           "replace what medtune writes there, or choose a new directory")
    return path


@contextlib.contextmanager
def claim_out_dir(path: Path, overwrite: bool = False, flag: str = "--out",
                  allow_existing: bool = False) -> Iterator[Path]:
    """check_out_dir, then create the dir and prove it writable (a probe file) before any heavy work. If the body
    fails and the dir was created here and is still empty, it is removed again: a refused command leaves no trace."""
    path = check_out_dir(path, overwrite, flag, allow_existing)
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = _tmp_name(path / PROBE)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise MedtuneError(f"{flag} {path}: can't write there ({e.strerror or e})") from None
    try:
        yield path
    except BaseException:
        if created and path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        raise


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
