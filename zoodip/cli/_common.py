"""Shared CLI plumbing: library errors become one-line click errors (no traceback)."""
from __future__ import annotations

import functools

import click

# Errors that library code raises on bad input; anything else is a bug and keeps its traceback.
# FloatingPointError: training diverged (the message names the intact checkpoint and the fix).
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError,
               FloatingPointError)


def friendly_errors(fn):
    """Turn library ValueError & co. into `Error: <message>` with exit code 1."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as err:
            raise click.ClickException(str(err)) from err
        except OSError as err:  # disk full, read-only file system, ...
            raise click.ClickException(f"{err.strerror or err}: {getattr(err, 'filename', '') or ''}".strip(": ")) from err
    return wrapper


provider_option = click.option(
    "--provider", default="auto", show_default=True,
    help="Execution provider: auto, cpu, cuda, dml, openvino, qnn, coreml.")
provider_options_option = click.option(
    "--provider-option", "provider_options", multiple=True, metavar="KEY=VALUE",
    help="Provider option, repeatable (e.g. device_type=CPU for openvino).")
