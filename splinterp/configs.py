"""What a config dataclass says about itself: each field's documentation and its allowed values.

Why: configs are documented where they are defined (a string literal under each field, as in this package's
dataclasses) and typed (`Literal[...]` for a closed set of values). The command line is generated from
exactly that, so a help text or a list of choices can never drift from the code, and a test can check that
every field of every config is documented.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from typing import Any, Literal

from splinterp.errors import ConfigError

__all__ = ["FieldInfo", "config_fields", "field_docs"]


@functools.cache
def _own_docs(cls: type) -> dict[str, str]:
    """{field: docstring} of the fields a class body defines itself (not inherited)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(source).body
    node = next((n for n in body if isinstance(n, ast.ClassDef)), None)
    if node is None:
        return {}
    docs: dict[str, str] = {}
    stmts = node.body
    for a, b in zip(stmts, stmts[1:]):
        if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
            docs[a.target.id] = " ".join(inspect.cleandoc(b.value.value).split())
    return docs


def field_docs(cls: type) -> dict[str, str]:
    """{field name: one-paragraph documentation} for every dataclass field of `cls` that has one (a string
    literal right under the field), inherited fields included (the subclass's text wins)."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise ConfigError(f"field_docs expects a dataclass type, got {cls!r}")
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_docs(klass))
    return docs


@dataclasses.dataclass(frozen=True)
class FieldInfo:
    """One config field as the command line sees it."""

    name: str
    type: Any
    """The resolved annotation."""
    base: Any
    """The type of one value with None removed: bool, int, float, str, a Literal, tuple/list of one of those,
    or something else (dict, a nested config) that the command line cannot express."""
    optional: bool
    """None is allowed."""
    many: bool
    """A tuple or list of values."""
    choices: tuple[Any, ...] | None
    """Allowed values (from Literal[...]), else None."""
    default: Any
    """The default value, or dataclasses.MISSING (required)."""
    doc: str
    metadata: types.MappingProxyType

    @property
    def scalar(self) -> type | None:
        """int, float, str or bool for one value; None when the field is not expressible on a command line."""
        t = self.base
        if typing.get_origin(t) is Literal:
            vals = typing.get_args(t)
            kinds = {type(v) for v in vals}
            return kinds.pop() if len(kinds) == 1 and kinds <= {str, int, float} else None
        return t if t in (bool, int, float, str) else None


def _split(tp: Any) -> tuple[Any, bool, bool]:
    """(base type, optional, many) of an annotation."""
    optional = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        if len(args) != 1:
            return tp, optional, False
        tp = args[0]
        origin = typing.get_origin(tp)
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if len(set(args)) == 1:
            return args[0], optional, True
        return tp, optional, False
    return tp, optional, False


def config_fields(cls: type) -> list[FieldInfo]:
    """Every dataclass field of `cls` with its resolved type, choices, default and documentation."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise ConfigError(f"config_fields expects a dataclass type, got {cls!r}")
    hints = typing.get_type_hints(cls)  # a config whose annotations do not resolve is a bug: let it raise
    docs = field_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        base, optional, many = _split(tp)
        choices = typing.get_args(base) if typing.get_origin(base) is Literal else None
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        out.append(FieldInfo(f.name, tp, base, optional, many, choices, default, docs.get(f.name, ""),
                             f.metadata))
    return out
