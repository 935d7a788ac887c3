"""Temp folders come from mkdtemp/mkstemp with owner-only modes; give finished outputs the usual umask modes."""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def umask_modes(root: Path) -> None:
    """chmod root and everything under it as if created normally (dirs 0777 & ~umask, files 0666 & ~umask)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~mask)


def swap_in(tmp: Path, out: Path) -> None:
    """Rename the finished tmp folder to out; an old out (--force) is moved aside first, removed after the rename."""
    old = out.with_name(f".{out.name}.old.{os.getpid()}") if out.exists() else None
    if old:
        os.replace(out, old)
    os.replace(tmp, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)
