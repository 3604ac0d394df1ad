"""The commands of `splinterp`: each one an options dataclass (documented fields, typed choices) and a
function that runs it. `splinterp.cli` builds the one argument parser from these, so the help text, the
choices and the defaults are those of the code.

A command is registered in `COMMANDS` below; `groups` adds the fields of a library config (e.g. `SAEConfig`)
as a group of flags whose values the command receives as a dict of what the user set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class FlagGroup:
    """The fields of a library config offered as flags of a command."""

    title: str
    config: type
    """The dataclass whose fields become flags (its defaults and docs are shown)."""
    dest: str
    """Field of the command's options that receives {field: value} for the flags the user gave."""
    skip: frozenset[str] = frozenset()
    """Fields the command sets itself (not offered as flags)."""


@dataclass(frozen=True)
class Command:
    name: str
    options: type
    """The options dataclass: one flag per field (positional when its metadata says `positional`)."""
    run: Callable[[Any], int]
    help: str
    description: str
    groups: tuple[FlagGroup, ...] = field(default=())


def commands() -> dict[str, Command]:
    """Every command, in the order `splinterp --help` lists them."""
    from splinterp.commands import geometry, harvest, notebooks, readme, reproduce, slice, train

    cmds = [*reproduce.COMMANDS, train.COMMAND, harvest.COMMAND, geometry.COMMAND, slice.COMMAND, readme.COMMAND,
            notebooks.COMMAND]
    return {c.name: c for c in cmds}
