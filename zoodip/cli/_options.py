"""Click options generated from a stage's config dataclass (zo_runtime.config.setting fields).

Fields marked cli=True become named options (name, type, default and help from the field); every
field can also be given as `--set NAME=VALUE`, so a default or a help string is written once.
"""
from __future__ import annotations

import dataclasses
import textwrap
import types
import typing
from pathlib import Path

import click


def _hints(cls) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


def _base(tp):
    """(plain type, optional?) of an annotation such as int, float | None or tuple[int, int]."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0], True
    return tp, False


def _option(f: dataclasses.Field, tp) -> click.Option:
    """One click option for field f: --name-with-dashes, or a --flag for booleans."""
    flag, help_ = f.metadata.get("flag") or f"--{f.name.replace('_', '-')}", f.metadata.get("help", "")
    required = f.default is dataclasses.MISSING
    tp, optional = _base(tp)
    kw = dict(help=help_, show_default=not required and f.default not in (None, ()), required=required)
    if tp is bool:          # on/off pair when the default is on or left to a schedule (None)
        pair = f.default or optional
        return click.Option([f"{flag}/--no-{flag[2:]}" if pair else flag, f.name],
                            default=f.default, is_flag=True, help=help_, show_default=False)
    if f.metadata.get("choices"):
        kw["type"] = click.Choice(f.metadata["choices"])
    elif typing.get_origin(tp) is tuple and typing.get_args(tp)[-1] is Ellipsis:   # (key, value) pairs
        kw.update(multiple=True, metavar=f.metadata.get("metavar") or "KEY=VALUE", show_default=False)
        return click.Option([flag, f.name], **kw)
    elif typing.get_origin(tp) is tuple:
        kw["type"] = tuple(typing.get_args(tp))
    else:
        kw["type"] = tp
    if not required:
        kw["default"] = f.default
    return click.Option([flag, f.name], metavar=f.metadata.get("metavar"), **kw)


def config_options(cls, extra_help: str = ""):
    """Decorator: the cli=True fields of `cls` as options, then `--set NAME=VALUE` for any field."""
    hints = _hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.metadata.get("cli")]
    settable = ", ".join(f.name for f in dataclasses.fields(cls) if not f.metadata.get("cli"))

    def deco(fn):
        fn.__click_params__ = getattr(fn, "__click_params__", [])
        fn.__click_params__.append(click.Option(
            ["--set", "sets"], multiple=True, metavar="NAME=VALUE",
            help=f"Any other setting, repeatable: {settable} (see `Settings` below).{extra_help}"))
        for f in reversed(fields):
            fn.__click_params__.append(_option(f, hints[f.name]))
        return fn
    return deco


def settings_epilog(cls) -> str:
    """The --set settings with their defaults and help, for a command's epilog."""
    lines = ["\b", "Settings for --set NAME=VALUE (shown at their defaults):"]
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli"):
            default = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
            lines.append(f"  {f.name}={default}")
            lines += textwrap.wrap(f.metadata.get("help", ""), 76, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def parse_value(text: str, tp, name: str):
    """A --set value in its field's type: ints, floats, true/false, none, or comma-separated tuples."""
    tp, optional = _base(tp)
    if optional and text.strip().lower() == "none":
        return None
    try:
        if tp is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError("use true or false")
            return text.lower() in ("true", "1", "yes", "on")
        if typing.get_origin(tp) is tuple:
            parts, types = [p.strip() for p in text.split(",")], typing.get_args(tp)
            if types[-1] is Ellipsis or len(parts) != len(types):
                raise ValueError(f"give {len(types)} comma-separated values")
            return tuple(t(p) for t, p in zip(types, parts))
        return tp(text)
    except ValueError as err:
        raise click.BadParameter(f"{name}={text!r}: {err}", param_hint="--set") from None


def build_config(cls, kw: dict, sets: tuple[str, ...] = (), **fixed):
    """cls(...) from the generated options' values, the --set pairs and `fixed` values."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in kw.items() if k in names}
    for item in sets:
        name, sep, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in names:
            raise click.BadParameter(f"{item!r}: expected NAME=VALUE with NAME one of {', '.join(sorted(names))}",
                                     param_hint="--set")
        values[name] = parse_value(text.strip(), hints[name], name)
    if "provider_options" in values and values["provider_options"] and isinstance(values["provider_options"][0], str):
        from zo_runtime.providers import parse_options
        values["provider_options"] = tuple(parse_options(values["provider_options"]).items())
    for k, v in list(values.items()):
        if isinstance(v, Path):
            values[k] = str(v)
    return cls(**{**values, **fixed})
