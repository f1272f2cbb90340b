"""The documentation of a config schema, read from its source: every field's dotted name, type, default and
docstring (the string right under it). `cppo config --doc` prints it and docs/reference/ is generated from it,
so that the reference can never disagree with the code."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class FieldDoc:
    section: str  # dotted section (`ppo`, `tasks[i].prompts`; "" for the top level)
    name: str
    type: str  # as a reader writes it: `int`, `float or null`, `one of hf, vllm`
    default: str  # as YAML would spell it
    doc: str

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}" if self.section else self.name


def docstrings(cls: type) -> dict[str, str]:
    """Field name → the docstring under it, in the class body of dataclass `cls`."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    found = {}
    for stmt, after in zip(body, body[1:], strict=False):
        if isinstance(stmt, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            found[stmt.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return found


def type_text(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [type_text(a) for a in args if a is not type(None)]
        return " or ".join(inner) + (" or null" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin is list:
        return f"list of {type_text(args[0])}"
    if origin is dict:
        return f"mapping of {type_text(args[0])} to {type_text(args[1])}"
    if dataclasses.is_dataclass(tp):
        return "section"
    return "any" if tp is Any else getattr(tp, "__name__", str(tp))


def default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        return "(section)"
    if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
        return "(one section)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    return str(value) if not isinstance(value, list | dict) else (str(value) if value else "[]" if
                                                                  isinstance(value, list) else "{}")


def _section_type(tp: Any) -> tuple[type | None, bool]:
    """The dataclass a field holds (its section), and whether as a list of them."""
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    for inner in [a for a in typing.get_args(tp) if a is not type(None)] if union else [tp]:
        if dataclasses.is_dataclass(inner):
            return inner, False
        if typing.get_origin(inner) is list and dataclasses.is_dataclass(typing.get_args(inner)[0]):
            return typing.get_args(inner)[0], True
    return None, False


def schema(cls: type, section: str = "") -> list[FieldDoc]:
    """Every field of dataclass `cls` and of its sections, sections after their parent's plain fields. A
    section type met again (a data section under prompts and eval_prompts) is documented once, at its first
    place, the later ones pointing there."""
    hints = typing.get_type_hints(cls)
    docs = docstrings(cls)
    plain, nested = [], []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner, listed = _section_type(tp)
        plain.append(FieldDoc(section, f.name, type_text(tp), default_text(f), docs.get(f.name, "")))
        if inner is not None:
            nested.append((f"{section}.{f.name}" if section else f.name) + ("[i]" if listed else ""))
            nested.append(inner)
    out = plain
    seen: dict[type, str] = {}
    for where, inner in zip(nested[::2], nested[1::2], strict=True):
        if inner in seen:
            continue
        seen[inner] = where
        out.extend(schema(inner, where))
    return out
