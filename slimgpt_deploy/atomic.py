"""Atomic outputs: write into a hidden temporary sibling, rename at the end.

An interrupted or failed run leaves no directory (or file) that looks
complete; an existing output is replaced only when the new one is whole.
A full disk or a read-only target becomes a one-line typed error.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import BadInputError, OutputExistsError, ResourceError, SlimGPTError

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def write_error(err: OSError, where: Path) -> SlimGPTError | None:
    """The typed error for a failed write under `where` (disk full, read-only), or None for other errors."""
    if err.errno in _NO_SPACE:
        return ResourceError(f"no space left on the device writing {where}; free some space or choose another --out")
    if err.errno in _NOT_WRITABLE:
        return BadInputError(
            f"cannot write {where} ({os.strerror(err.errno)}); choose an --out in a writable directory"
        )
    return None


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse an existing output unless `force`; refuse an unwritable parent. Call before any work."""
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"output {out} already exists; pass --force to replace it or choose another --out")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {out} exists and is not a directory; remove it or choose another --out")
    probe = existing_parent(out)
    if not os.access(probe, os.W_OK):
        raise BadInputError(f"cannot write to {probe}; choose an --out in a writable directory")


def existing_parent(out: Path) -> Path:
    """The nearest existing directory above `out` (where it will be created)."""
    probe = Path(out).absolute().parent
    while not probe.exists():
        probe = probe.parent
    return probe


@contextmanager
def atomic_output_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` when the block finishes without error."""
    out = Path(out)
    check_output_dir(out, force)
    tmp = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        typed = write_error(err, out)
        if typed is None:
            raise
        raise typed from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write(path: Path, write: Callable[[Path], None], *, fsync: bool = True) -> Path:
    """Write a file through `write(tmp_path)`, then rename it over `path` (os.replace).

    Readers (and a process killed at any moment) see the old file or the new
    one, never a half-written one. `fsync` makes the data durable before the
    rename, so a crash of the machine cannot leave a renamed but empty file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path, data, *, indent: int = 2) -> Path:
    """`data` as JSON (and a final newline) at `path`, written atomically (see `atomic_write`); parents made."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=indent, default=str) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def fsync_dir(directory: Path) -> None:
    """Make renames inside `directory` durable (best effort: not every platform allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
