"""The README's tour is executed as written, so it cannot drift from the code."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def tour_code() -> str:
    text = README.read_text()
    section = text[text.index("## A tour"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README has no python block under '## A tour'"
    return match.group(1)


def test_readme_tour_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(tour_code(), str(README), "exec"), {"__name__": "readme_tour"})
    assert (tmp_path / "topk_power_diagram.png").stat().st_size > 0
    assert (tmp_path / "my_sae" / "cfg.json").exists()
