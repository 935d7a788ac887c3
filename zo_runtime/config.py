"""Config fields that carry their own help: one place for a stage's defaults, reasons and CLI text.

A stage's frozen dataclass declares each field with `setting(default, help)`; the CLI (zoodip/cli)
generates its options from these fields, so a default or a help string is written once.
"""
from __future__ import annotations

import dataclasses
from typing import Any


def setting(default: Any = dataclasses.MISSING, help: str = "", *, cli: bool = False,
            choices: tuple[str, ...] | None = None, metavar: str | None = None, flag: str | None = None) -> Any:
    """A dataclass field with its help text. cli=True: a named option of the stage's command; every other
    field is still settable with `--set NAME=VALUE`. choices: the allowed strings (click.Choice); flag: the
    option's name when not --field-name."""
    return dataclasses.field(default=default, metadata={"help": help, "cli": cli, "choices": choices,
                                                        "metavar": metavar, "flag": flag})
