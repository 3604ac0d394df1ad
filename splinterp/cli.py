"""The command line: ``splinterp <command>`` (or ``python -m splinterp <command>``, or under torchrun
``torchrun --nproc_per_node N -m splinterp train|harvest ...``).

This is the one module that builds an argument parser. Every option is generated from the documented
dataclasses of `splinterp.commands` (and, for `train`, from `SAEConfig` and `PAMConfig`): the field's
docstring is the help text, its `Literal[...]` type gives the allowed values, its default is the default.
``splinterp COMMAND --help`` lists them all.

Exit status: 0 on success, 1 when a job of `reproduce` failed, 2 for a user mistake (bad argument, missing
or unreadable file, refused output folder: one line on stderr, no traceback), 130 on Ctrl-C. A bug in
splinterp still shows its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from typing import Any

from splinterp.commands.reproduce import RESULTS, SUMMARY
from splinterp.configs import FieldInfo, config_fields
from splinterp.errors import SplinterpError

log = logging.getLogger("splinterp.cli")

__all__ = ["RESULTS", "SUMMARY", "build_parser", "main", "options_from"]


def _flag(name: str, prefix: str = "") -> str:
    return "--" + (prefix + name).replace("_", "-")


def _help(f: FieldInfo, show_default: bool = True) -> str:
    text = f.doc or ""
    if f.choices:
        text += f" One of: {', '.join(map(str, f.choices))}."
    show_default = (show_default and not f.metadata.get("required") and f.default is not dataclasses.MISSING
                    and "default" not in text.lower())
    if show_default and f.scalar is not bool:
        if f.default is None:
            text += " (default: none)"
        elif not (f.many and not f.default):
            shown = " ".join(map(str, f.default)) if f.many else f.default
            text += f" (default: {shown})"
    return text.replace("%", "%%").strip()


def _value_type(f: FieldInfo):
    t = f.scalar
    if t is None:
        return None
    if t is bool:
        return bool
    name = {int: "an integer", float: "a number", str: "a string"}[t]

    def parse(text: str):
        try:
            return t(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {name}, got {text!r}") from None

    parse.__name__ = t.__name__
    return parse


def add_field(parser, f: FieldInfo, *, dest: str, prefix: str = "", suppress_default: bool = False) -> bool:
    """One argparse argument for one config field; False when the field cannot be given on a command line
    (a dict or a nested config)."""
    vtype = _value_type(f)
    if vtype is None:
        return False
    default = argparse.SUPPRESS if suppress_default else (None if f.default is dataclasses.MISSING else f.default)
    kw: dict[str, Any] = {"dest": dest, "default": default, "help": _help(f), "metavar": f.name.upper()}
    if f.metadata.get("positional"):
        parser.add_argument(dest, type=vtype, choices=f.choices, help=_help(f, show_default=False),
                            metavar=f.name.upper())
        return True
    if vtype is bool:
        kw.pop("metavar")
        parser.add_argument(_flag(f.name, prefix), action=argparse.BooleanOptionalAction, **kw)
        return True
    if f.choices:
        kw["choices"] = f.choices
        kw["metavar"] = "{" + ",".join(map(str, f.choices)) + "}"
    if f.many:
        kw["nargs"] = "+"
    if f.metadata.get("required"):
        kw["required"] = True
        kw.pop("default")
    parser.add_argument(_flag(f.name, prefix), type=vtype, **kw)
    return True


def _add_command(sub, cmd) -> None:
    p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description)
    for f in config_fields(cmd.options):
        if f.metadata.get("group"):
            continue
        if not add_field(p, f, dest=f.name):
            raise TypeError(f"{cmd.options.__name__}.{f.name}: type {f.type} cannot be a command-line option")
    groups = []
    for g in cmd.groups:
        grp = p.add_argument_group(g.title)
        names = []
        for f in config_fields(g.config):
            if f.name in g.skip:
                continue
            if add_field(grp, f, dest=f"{g.dest}.{f.name}", suppress_default=True):
                names.append(f.name)
        groups.append((g.dest, names))
    p.set_defaults(_command=cmd, _groups=groups)


def build_parser() -> argparse.ArgumentParser:
    """The `splinterp` argument parser, generated from `splinterp.commands`."""
    import splinterp
    from splinterp.commands import commands

    p = argparse.ArgumentParser(prog="splinterp", description="The spline geometry of sparse autoencoders: exact "
                                "regions and power diagrams, reference autoencoders, PAM-SGD and SGD training, "
                                "and the figures of the SplInterp paper.")
    p.add_argument("--version", action="version", version=f"splinterp {splinterp.__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in commands().values():
        _add_command(sub, cmd)
    return p


def options_from(args: argparse.Namespace):
    """The command's options dataclass built from parsed arguments (group flags collected into dicts)."""
    cmd = args._command
    values = vars(args)
    kw = {f.name: values[f.name] for f in dataclasses.fields(cmd.options)
          if f.name in values and not f.metadata.get("group")}
    for dest, names in args._groups:
        kw[dest] = {n: values[f"{dest}.{n}"] for n in names if f"{dest}.{n}" in values}
    return cmd.options(**kw)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args._command.run(options_from(args)) or 0)
    except SplinterpError as e:
        print(f"splinterp {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"splinterp {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
