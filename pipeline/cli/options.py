"""Command-line options generated from `AugmentConfig`: the config field is the one declaration of a setting.

Every field (but those in `config.CONFIG_FILE_ONLY`) becomes `--field-name` on `augment` and
`augment flow`, with the field's description as help, its default shown, and its choices (a `Literal`)
as the metavar. A flag's text goes to pydantic unconverted (booleans are `--x/--no-x` switches), so the
config validates every value, whatever it came from (flag, config file or Prefect parameters), and
a bad value is one line naming the flag:

    --strength nan: not a number
    --guidance nope: Input should be 'none', 'latent', 'posterior', 'lookahead' or 'noisy'

Multi-valued fields (tuples) take comma-separated values (`--bandwidth-factors 0.5,1,2`). A field typed
as a number or a word (`float | Literal["auto"]`) takes either; one that may be None takes `none`
(`--lookahead-steps none`: end-to-end guidance).
"""

from __future__ import annotations

import inspect
import math
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import typer
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from ..config import CONFIG_FILE_ONLY, AugmentConfig

_NUMBER_NAMES = {int: "INTEGER", float: "FLOAT", str: "TEXT", bool: "true|false"}


def flag(name: str) -> str:
    """`--field-name` of a config field."""
    return "--" + name.replace("_", "-")


def flag_fields() -> dict[str, FieldInfo]:
    """The config fields that have a flag, in declaration order."""
    return {k: v for k, v in AugmentConfig.model_fields.items() if k not in CONFIG_FILE_ONLY}


def _alternatives(annotation: Any) -> list[Any]:
    """The members of a union (`X | None` -> [X]); a non-union annotation alone. None is dropped."""
    if get_origin(annotation) in (Union, types.UnionType):
        return [a for a in get_args(annotation) if a is not type(None)]
    return [annotation]


def _choices(annotation: Any) -> list[str]:
    return [str(v) for a in _alternatives(annotation) if get_origin(a) is Literal for v in get_args(a)]


def is_switch(field: FieldInfo) -> bool:
    return _alternatives(field.annotation) == [bool]


def is_sequence(field: FieldInfo) -> bool:
    return any(get_origin(a) is tuple for a in _alternatives(field.annotation))


def metavar(field: FieldInfo) -> str:
    """How the value is written: `[a|b|c]`, `FLOAT|auto`, `FLOAT,FLOAT`, `FLOAT,...`, `INTEGER`, `TEXT`."""
    parts = []
    for a in _alternatives(field.annotation):
        if get_origin(a) is Literal:
            continue
        if get_origin(a) is tuple:
            args = get_args(a)
            if len(args) == 2 and args[1] is Ellipsis:
                parts.append(f"{_NUMBER_NAMES.get(args[0], 'TEXT')},...")
            else:
                parts.append(",".join(_NUMBER_NAMES.get(t, "TEXT") for t in args))
        else:
            parts.append(_NUMBER_NAMES.get(a, "TEXT"))
    choices = _choices(field.annotation) + (["none"] if is_optional(field) else [])
    if not parts:
        return "[" + "|".join(choices) + "]"
    return "|".join(parts + choices)


def _shown_default(field: FieldInfo) -> str:
    value = field.default
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    if value is None:
        return "none"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _help(field: FieldInfo) -> str:
    text = field.description or ""
    if field.is_required():
        return text + "  [required unless in --config]"
    return f"{text}  [default: {_shown_default(field)}]"


def keyword_option(name: str, annotation: Any, default: Any, *decls: str, help: str) -> inspect.Parameter:
    """A keyword-only parameter that typer reads as an option (for signatures built at run time)."""
    option = typer.Option(*decls, help=help)
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[annotation, option]
    )


def option_parameters() -> list[inspect.Parameter]:
    """One keyword-only `typer.Option` parameter per flag field (default None: not given)."""
    params = []
    for name, field in flag_fields().items():
        if is_switch(field):
            annotation: Any = bool | None
            option = typer.Option(help=_help(field), show_default=False)
        else:
            annotation = str | None
            option = typer.Option(help=_help(field), show_default=False, metavar=metavar(field))
        annotated = Annotated[annotation, option]
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotated))
    return params


def is_optional(field: FieldInfo) -> bool:
    """A field that may be None (`--lookahead-steps none`: end-to-end guidance)."""
    return get_origin(field.annotation) in (Union, types.UnionType) and type(None) in get_args(field.annotation)


def config_values(values: dict[str, Any]) -> dict[str, Any]:
    """The given flags (None = not given) as config input: `none` for None where a field allows it,
    comma lists split, the rest as typed."""
    fields = flag_fields()
    out = {}
    for name, value in values.items():
        if value is None or name not in fields:
            continue
        if isinstance(value, str) and is_optional(fields[name]) and value.strip().lower() == "none":
            value = None
        elif isinstance(value, str) and is_sequence(fields[name]):
            value = [part.strip() for part in value.split(",")]
        out[name] = value
    return out


def describe_errors(exc: ValidationError) -> str:
    """A pydantic error of `AugmentConfig` as one line, by flag: `--n 0: Input should be ...; --ref: missing`."""
    by_field: dict[str, list[dict[str, Any]]] = {}
    for error in exc.errors():
        loc = error.get("loc") or ("",)
        by_field.setdefault(str(loc[0]), []).append(error)
    return "; ".join(_describe_field(name, errors) for name, errors in by_field.items())


def _describe_field(name: str, errors: list[dict[str, Any]]) -> str:
    first = errors[0]
    if not name:  # a check across settings (`AugmentConfig._check`)
        return first["msg"].removeprefix("Value error, ")
    where = flag(name) if name in AugmentConfig.model_fields else name
    if first["type"] == "missing":
        return f"{where}: missing (give it, or --config FILE)"
    if first["type"] == "extra_forbidden":
        return f"{name}: not a setting of augment"
    value = first.get("input")
    shown = f"{where} {_show(value)}" if name in AugmentConfig.model_fields else where
    number = _as_float(value)
    if number is not None and not math.isfinite(number):
        return f"{shown}: {'not a number' if math.isnan(number) else 'not a finite number'}"
    # A union (`float | Literal["auto"]`) reports one error per member: show the one of the member that
    # the value looks like (a number's range error, not "should be 'auto'").
    best = min(errors, key=lambda e: e["type"].startswith("literal") or e["type"] == "float_parsing")
    return f"{shown}: {best['msg']}"


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _show(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."
