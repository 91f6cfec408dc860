"""Writing a whole folder or nothing: build it under a temporary sibling name, rename at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator


@contextlib.contextmanager
def atomic_directory(target: str, *, overwrite: bool = False) -> Iterator[str]:
    """Yields a fresh temporary folder next to ``target``; when the block completes, it becomes
    ``target`` (an existing ``target`` is replaced only then, and only with ``overwrite``). On an
    exception the temporary folder is deleted and ``target`` is left as it was."""
    target = os.path.abspath(target)
    if os.path.exists(target) and not overwrite:
        raise FileExistsError(f"{target} already exists (use overwrite / --overwrite to replace it)")
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.partial-", dir=parent)
    try:
        yield tmp
        old = None
        if os.path.exists(target):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=parent)
            os.rename(target, os.path.join(old, "previous"))
        os.rename(tmp, target)
        tmp = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
