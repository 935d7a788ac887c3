"""Temp folders come from mkdtemp/mkstemp with owner-only modes; give finished outputs the usual umask modes."""
from __future__ import annotations

import os
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
