"""`splinterp readme`: fill the README's results blocks from the result files of a `splinterp reproduce` run.

A block is::

    <!-- results JOB/TABLE -->
    ...generated markdown...
    <!-- /results -->

and its content is `registry.get(JOB).tables(results_folder)[TABLE]`: the job's own rendering of its result
files. `--check` only compares (exit 1 and the names of the stale blocks when they differ), which is what the
test suite runs against the committed `results/` folder.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from splinterp.commands import Command
from splinterp.errors import ConfigError, DatasetNotFoundError

BLOCK = re.compile(r"(<!-- results (?P<job>[\w-]+)/(?P<table>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)


@dataclass
class ReadmeOptions:
    results: str = "results"
    """Folder holding the result files of a `splinterp reproduce` run (the committed full run: results/)."""
    readme: str = "README.md"
    """The markdown file whose results blocks are filled."""
    check: bool = False
    """Only compare: exit 1, naming the stale blocks, when a block differs from what the results give."""


def fill(text: str, results: Path) -> tuple[str, list[str]]:
    """(text with every results block regenerated, names of the blocks whose content changed)."""
    from splinterp.experiments import registry

    if not results.is_dir():
        raise DatasetNotFoundError(f"results folder {results} does not exist")
    jobs = registry.load_all()
    rendered: dict[str, dict[str, str]] = {}
    changed: list[str] = []

    def block(m: re.Match) -> str:
        job, table = m.group("job"), m.group("table")
        if job not in jobs or jobs[job].tables is None:
            raise ConfigError(f"README block {job}/{table}: job {job!r} has no tables")
        if job not in rendered:
            rendered[job] = jobs[job].tables(results)
        if table not in rendered[job]:
            raise ConfigError(f"README block {job}/{table}: job {job!r} renders {sorted(rendered[job])}")
        body = rendered[job][table].rstrip("\n") + "\n"
        if body != m.group("body"):
            changed.append(f"{job}/{table}")
        return m.group(1) + body + m.group(5)

    return BLOCK.sub(block, text), changed


def run_readme(o: ReadmeOptions) -> int:
    from splinterp.atomic import write_text

    path = Path(o.readme)
    if not path.is_file():
        raise DatasetNotFoundError(f"--readme {path} does not exist")
    text = path.read_text("utf-8")
    new, changed = fill(text, Path(o.results))
    if o.check:
        if changed:
            print(f"splinterp readme: {len(changed)} block(s) differ from {o.results}: {', '.join(changed)}",
                  file=sys.stderr)
            return 1
        print(f"splinterp readme: every results block of {path} matches {o.results}/")
        return 0
    if changed:
        write_text(path, new)
    print(f"splinterp readme: {len(changed)} block(s) of {path} updated from {o.results}/")
    return 0


COMMAND = Command("readme", ReadmeOptions, run_readme, "fill the README's results tables from result files",
                  "Regenerate every `<!-- results JOB/TABLE -->` block of a markdown file from the result files of "
                  "a reproduce run (each job renders its own tables), or check that they match.")
