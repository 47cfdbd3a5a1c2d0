"""The README's config reference is ABConfig's own help text, field for field."""

from __future__ import annotations

from pathlib import Path

from ab_accel import ABConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_config_reference_matches_the_dataclass():
    text = README.read_text()
    for name, help_text in ABConfig.help().items():
        assert f"| `{name}` | {help_text} |" in text, f"README row for {name} is stale"


def test_readme_starts_with_the_two_commands():
    text = README.read_text()
    setup = text.index("## Set-up: two commands")
    block = text[setup:text.index("```", text.index("```", setup) + 3)]
    assert "make demo" in block and "make test" in block
    assert setup < text.index("## The Python API")
