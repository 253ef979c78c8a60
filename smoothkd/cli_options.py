"""Typer parameters generated from a config dataclass's fields, so that a command's flags, defaults
and --help cannot drift from its config (typer reads a command's parameters from its signature)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from typing import Any, Callable, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from smoothkd.errors import SmoothkdError
from smoothkd.options import default_of

R = TypeVar("R")


def config_command(cls: type) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Turn `fn(cfg, **extra)` into a command taking one option per field of `cls` (in field order),
    then fn's own options; the command builds `cls` from the first and calls fn with the rest."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)

    def decorate(fn: Callable[..., R]) -> Callable[..., R]:
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
               for p in list(inspect.signature(fn, eval_str=True).parameters.values())[1:]]
        params = [_parameter(f, hints[f.name]) for f in fields] + own

        @functools.wraps(fn)
        def command(**kwargs: Any) -> R:
            values = {f.name: _parse(f, kwargs.pop(f.name)) for f in fields}
            return fn(cls(**values), **kwargs)

        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate


def flag(f: dataclasses.Field) -> str:
    """The command-line flag of a config field."""
    form = f.metadata.get("cli")
    return (form.flag if form and form.flag else None) or "--" + f.name.replace("_", "-")


def _parameter(f: dataclasses.Field, hint: Any) -> inspect.Parameter:
    form = f.metadata.get("cli")
    value = default_of(f)
    default = ... if f.metadata.get("required") else form.show(value) if form else value
    # A bool option named by its field keeps typer's --x/--no-x pair; an explicit flag would drop --no-x.
    decls = [form.flag] if form and form.flag else []
    # Help texts are plain (e.g. smoothkd[vllm]); typer renders them as rich markup.
    option = typer.Option(default, *decls, help=escape(f.metadata.get("help", "") + (form.note if form else "")))
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                             annotation=form.type if form else hint)


def _parse(f: dataclasses.Field, value: Any) -> Any:
    form = f.metadata.get("cli")
    return form.parse(value, flag(f)) if form else value


def friendly(fn: Callable[..., R]) -> Callable[..., R]:
    """User errors become one red message and exit code 2, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> R:
        try:
            return fn(*args, **kwargs)
        except SmoothkdError as e:
            Console(stderr=True).print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, markup=True,
                                       soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper
