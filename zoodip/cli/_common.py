"""Shared CLI plumbing: the one error boundary that turns library failures into one line (no traceback).

Library code raises ValueError & co. with the problem and the fix where the fact is known; this boundary
only formats them, and names the few outside failures that can still reach it (a damaged npz, memory,
the file system). `zoodip --debug ...` or ZOODIP_DEBUG=1 shows the traceback instead.
"""
from __future__ import annotations

import functools
import os
import zipfile

import click

# Errors that library code raises on bad input; anything else is a bug and keeps its traceback.
# FloatingPointError: training diverged (the message names the intact checkpoint and the fix).
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError,
               IsADirectoryError, FloatingPointError)


def debug() -> bool:
    return os.environ.get("ZOODIP_DEBUG", "") not in ("", "0")


def describe(err: BaseException) -> str | None:
    """The one line for an error a user can act on, or None for a bug (which keeps its traceback)."""
    if isinstance(err, USER_ERRORS):
        return str(err)
    if isinstance(err, zipfile.BadZipFile):
        return f"{err}: a .npz file is damaged; delete it (or choose another --out) and run again"
    if isinstance(err, MemoryError):
        return "out of memory: lower --resolution, close other programs, or use a smaller --scheme (w4)"
    if isinstance(err, OSError):          # disk full, read-only file system, ...
        return f"{err.strerror or err}: {getattr(err, 'filename', '') or ''}".strip(": ")
    return None


def friendly_errors(fn):
    """Turn library ValueError & co. into `Error: <message>` with exit code 1 (the traceback with --debug)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except Exception as err:
            line = describe(err)
            if line is None or debug():
                raise
            raise click.ClickException(line) from err
    return wrapper


provider_option = click.option(
    "--provider", default="auto", show_default=True,
    help="Execution provider: auto, cpu, cuda, dml, openvino, qnn, coreml.")
provider_options_option = click.option(
    "--provider-option", "provider_options", multiple=True, metavar="KEY=VALUE",
    help="Provider option, repeatable (e.g. device_type=CPU for openvino).")
