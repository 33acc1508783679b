"""The README's configuration table is generated from the settings object; this keeps the two in step."""

from pathlib import Path

from semcache.cli_core import settings_table

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_lists_every_setting_as_generated():
    text = README.read_text()
    start, end = "<!-- settings-table:start -->", "<!-- settings-table:end -->"
    table = text[text.index(start) + len(start): text.index(end)].strip()
    assert table == settings_table().strip(), "run: semcache config --markdown, and paste it into the README"


def test_readme_names_the_two_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text
