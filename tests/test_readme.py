"""README.md shows what this repository runs: its test file is tests/test_readme_example.py, verbatim."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = "<!-- tests/test_readme_example.py -->\n```python\n"


def test_the_readme_test_file_is_the_one_the_suite_runs() -> None:
    """The copyable test file in README.md is tests/test_readme_example.py, byte for byte."""
    readme = (ROOT / "README.md").read_text()
    assert MARKER in readme, "README.md lost its test file block"
    shown = readme.split(MARKER, 1)[1].split("```\n", 1)[0]
    assert shown == (ROOT / "tests" / "test_readme_example.py").read_text()
