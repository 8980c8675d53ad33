"""What every settings model shares: numbers that are numbers, and errors that name the setting.

Settings come from TOML, the environment and flags, so strings must still parse ("8",
"0.5"); but pydantic's lax mode also reads `concurrency = true` as 1 and "inf" or "nan" as
floats, and a bool or a non-finite number is never what a user meant by a count or a
rate. The ranges sit on the fields (Field(ge=..., le=...)), and `describe` turns them into
the words every error message uses, so the rule and its message cannot drift apart.
"""
from __future__ import annotations

import difflib
import math
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional, Union

import annotated_types as at
from pydantic import BaseModel, BeforeValidator, FiniteFloat, ValidationError
from pydantic.fields import FieldInfo


def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a bool is not a number")
    return value


def _none_word(value: Any) -> Any:
    """TOML has no null: `seed = "none"` there, `--seed none` on the command line."""
    return None if isinstance(value, str) and value.strip().lower() == "none" else value


Int = Annotated[int, BeforeValidator(_no_bool)]
Float = Annotated[FiniteFloat, BeforeValidator(_no_bool)]
OptInt = Annotated[Optional[Int], BeforeValidator(_none_word)]
OptFloat = Annotated[Optional[Float], BeforeValidator(_none_word)]


def base_type(annotation: Any) -> tuple[Any, bool]:
    """The type under Optional/Annotated, and whether None is allowed."""
    optional = False
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            optional = optional or len(args) < len(typing.get_args(annotation))
            annotation = args[0] if len(args) == 1 else annotation
            if len(args) != 1:
                return annotation, optional
        else:
            return annotation, optional


def _num(x: Any) -> str:
    return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)


def describe(field: FieldInfo) -> str:
    """The values a field takes, in words: 'a number from 0 to 2', 'an integer at least 1'."""
    base, optional = base_type(field.annotation)
    origin = typing.get_origin(base)
    if base is bool:
        text = "true or false"
    elif base is int:
        text = "an integer"
    elif base is float:
        text = "a finite number"
    elif base is str:
        text = "a string"
    elif base is Path:
        text = "a path"
    elif origin is Literal:
        text = "one of " + ", ".join(map(str, typing.get_args(base)))
    elif origin is tuple or origin is list:
        item, _ = base_type(typing.get_args(base)[0])
        if typing.get_origin(item) is Literal:
            text = "a list, each one of " + ", ".join(map(str, typing.get_args(item)))
        else:
            text = f"a list of {'paths' if item is Path else 'strings'}"
    elif origin is dict:
        text = "a table"
    else:
        text = "a value"
    bounds = {type(m): m for m in field.metadata}
    ge, gt = bounds.get(at.Ge), bounds.get(at.Gt)
    le, lt = bounds.get(at.Le), bounds.get(at.Lt)
    if ge and le:
        text += f" from {_num(ge.ge)} to {_num(le.le)}"
    else:
        parts = [f"greater than {_num(gt.gt)}" if gt else f"at least {_num(ge.ge)}" if ge else "",
                 f"less than {_num(lt.lt)}" if lt else f"at most {_num(le.le)}" if le else ""]
        if any(parts):
            text += " " + " and ".join(p for p in parts if p)
    if bounds.get(at.MinLen) and bounds[at.MinLen].min_length == 1 and base is str:
        text = "a non-empty string"
    pattern = next((m.pattern for m in field.metadata if getattr(m, "pattern", None)), None)
    if pattern and base is str:
        text = f"a string matching {pattern}"
    return text + (", or none" if optional else "")


def _field(model: type[BaseModel], loc: tuple) -> tuple[tuple[str, ...], Optional[FieldInfo]]:
    """The setting an error's location points at: its names, from the top, and its field."""
    names: list[str] = []
    field = None
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            break
        field = model.model_fields[part]
        names.append(part)
        model, _ = base_type(field.annotation)
    return tuple(names), field


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"  # as TOML and JSON write it
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def problems(err: ValidationError, model: type[BaseModel],
             name: Callable[[tuple[str, ...]], str]) -> list[str]:
    """One sentence per error: the setting as the user wrote it (`name` of its field names),
    what it takes, and what it got."""
    out = []
    for e in err.errors():
        names, field = _field(model, tuple(e["loc"]))
        where = name(names) if names else "settings"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            parent = model
            for n in names:
                parent, _ = base_type(parent.model_fields[n].annotation)
            unknown = str(e["loc"][len(names)])
            close = difflib.get_close_matches(unknown, list(parent.model_fields), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            out.append(f"{name((*names, unknown))}: no such setting{hint}")
        elif e["type"] == "setting":   # a validator's own sentence (PydanticCustomError("setting", ...))
            out.append(f"{where}: {msg}")
        elif field is None or (isinstance(base_type(field.annotation)[0], type)
                                and issubclass(base_type(field.annotation)[0], BaseModel)):
            out.append(f"{where}: {msg}")  # about a whole table: a rule across its fields
        else:
            out.append(f"{where}: expected {describe(field)}, got {_shown(e['input'])}")
    return out
