"""The package's shape, checked from its source: no import cycle, one argument parser, experiments as leaves,
documented configs, and modules of a readable size."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import pkgutil
from pathlib import Path

import pytest

import splinterp

ROOT = Path(splinterp.__file__).resolve().parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text("utf-8")) for p in sorted(ROOT.rglob("*.py"))}


def _imports(name: str, tree: ast.Module, modules: set[str]) -> set[str]:
    """splinterp modules `name` imports anywhere (module level or inside functions)."""
    out = set()
    is_pkg = name in modules and any(m.startswith(name + ".") for m in modules)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            if t in modules and t != name:
                out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    src = _sources()
    modules = set(src)
    # a package's __init__ re-exporting its submodules is not a dependency of those submodules on each other
    return {m: {t for t in _imports(m, tree, modules) if not m.startswith(t + ".")} for m, tree in src.items()}


def test_no_import_cycle_inside_splinterp():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t] if t in stack else [m, t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_experiments_are_leaves():
    """Nothing in the library imports an experiment, and no experiment imports another (the registry, which
    defines the job contract, is the one shared module)."""
    graph = _graph()
    exp = "splinterp.experiments"
    for m, targets in graph.items():
        bad = {t for t in targets if t.startswith(exp + ".") and t != f"{exp}.registry"}
        if m.startswith(exp + ".") or m == exp:
            assert not bad, f"{m} imports experiment modules {sorted(bad)}"
        elif not m.startswith("splinterp.commands"):
            assert not {t for t in targets if t.startswith(exp)}, f"library module {m} imports {targets}"


def test_exactly_one_module_builds_an_argument_parser():
    builders = set()
    for name, tree in _sources().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                if called in ("ArgumentParser", "add_parser"):
                    builders.add(name)
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if "argparse" in names:
                    builders.add(name)
    assert builders == {"splinterp.cli"}


def test_no_source_file_is_a_catch_all():
    """Files of more than ~600 lines are where several ideas end up together."""
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py")
            if (n := len(p.read_text("utf-8").splitlines())) > 650}
    assert not long, long


def _config_classes() -> list[type]:
    """Every dataclass defined in splinterp (imported from every module)."""
    found = {}
    for info in pkgutil.walk_packages(splinterp.__path__, "splinterp."):
        if info.name.endswith("__main__"):
            continue
        mod = importlib.import_module(info.name)
        for obj in vars(mod).values():
            if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == info.name:
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return [found[k] for k in sorted(found)]


CONFIG_SUFFIXES = ("Config", "Options", "Settings")


@pytest.mark.parametrize("cls", [c for c in _config_classes() if c.__name__.endswith(CONFIG_SUFFIXES)],
                         ids=lambda c: c.__qualname__)
def test_every_config_field_is_documented(cls):
    from splinterp.configs import config_fields

    missing = [f.name for f in config_fields(cls) if not f.doc]
    assert not missing, f"{cls.__module__}.{cls.__qualname__}: undocumented fields {missing}"


def test_every_command_option_can_be_given_on_the_command_line():
    from splinterp.cli import build_parser
    from splinterp.commands import commands

    build_parser()  # raises TypeError for an option type the generator cannot express
    assert set(commands()) >= {"reproduce", "figure", "list", "train", "harvest", "geometry"}


def test_the_readme_layout_matches_the_tree():
    """Every module and package of splinterp/ is in the README's layout list, and every name listed exists."""
    import re

    text = (ROOT.parent / "README.md").read_text()
    block = re.search(r"```\n(splinterp/\n.*?)```", text[text.index("## Layout"):], re.S).group(1)
    listed = set()
    for line in block.splitlines():
        if re.match(r"  \S", line):  # an entry of splinterp/: names before the two-space gap to its description
            head = re.split(r"\s{2,}", line[2:].rstrip(), maxsplit=1)[0]
            listed |= {n.strip() for n in head.split(",")}
    actual = {p.name + "/" for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    actual |= {p.name for p in ROOT.glob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    assert not actual - listed, f"README layout does not list {sorted(actual - listed)}"
    assert not listed - actual, f"README layout lists what does not exist: {sorted(listed - actual)}"
