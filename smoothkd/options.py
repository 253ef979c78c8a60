"""Config dataclass helpers: each field declares itself once (default, help text, how the command
line reads it, whether a resumed run must keep it); --help, the CLI parameters (smoothkd.cli_options)
and distill's resume check read it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from smoothkd.errors import SmoothkdError


@dataclass(frozen=True)
class CliForm:
    """How the command line gives a field that is not read as its own type."""

    type: Any  # what the command line parses
    parse: Callable[[Any, str], Any]  # (command-line value, flag) -> field value; may raise SmoothkdError
    show: Callable[[Any], Any] = lambda default: default  # field default -> command-line default
    flag: str | None = None  # default: --field-name
    note: str = ""  # appended to the help text


def _split_commas(text: str, flag: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _existing_file(path: Path | None, flag: str) -> str | None:
    if path is not None and not path.is_file():
        raise SmoothkdError(f"{flag} {path}: no such file")
    return None if path is None else str(path)


COMMA_LIST = CliForm(str, _split_commas, show=",".join, note=" Comma-separated.")
EXISTING_FILE = CliForm(Optional[Path], _existing_file)


def opt(default: Any, help: str, *, required: bool = False, cli: CliForm | None = None, resume: bool = True) -> Any:
    """A config field with its help text. `required`: the command line must give it (the empty default
    lets code build a config field by field; validate() reports it missing). `cli`: how the command line
    reads it, when not as the field's own type. `resume`: a resumed distill run must keep its value."""
    metadata = {"help": help, "required": required, "cli": cli, "resume": resume}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def doc(cls: type, name: str) -> str:
    """The help text of a config field."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}[name]
