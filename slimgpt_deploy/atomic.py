"""Atomic output directories: write into a hidden temporary sibling, rename at the end.

An interrupted or failed run leaves no directory that looks complete; an
existing output is replaced only when the new one is whole.
"""
from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import BadInputError, OutputExistsError


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse an existing output unless `force`; refuse an unwritable parent. Call before any work."""
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"output {out} already exists; pass --force to replace it or choose another --out")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {out} exists and is not a directory; remove it or choose another --out")
    parent = out.absolute().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise BadInputError(f"cannot write to {probe}; choose an --out in a writable directory")


@contextmanager
def atomic_output_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` when the block finishes without error."""
    out = Path(out)
    check_output_dir(out, force)
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
