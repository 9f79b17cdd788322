"""tools/check_figures.py (`make check-figures`): a table that its script no longer prints is
named with its changed rows, a current one passes, timing columns do not count, and `--write`
replaces the table and nothing else. Every table it covers is found in its page."""
import argparse
import importlib.util
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_figures", ROOT / "tools" / "check_figures.py")
cf = importlib.util.module_from_spec(_spec)
sys.modules["check_figures"] = cf  # NamedTuple looks its module up there
_spec.loader.exec_module(cf)

HEADER = "| precision | line_fit | val accuracy | ms/step |"
PAGE = f"""# A page

Some text before.

{HEADER}
|---|---|---:|---:|
| fp32 | robust | 98.3% | 2.10 |
| bf16 parameters | robust | 98.6% | 3.40 |

Text after the table.
"""


def _figure(printed: str) -> "cf.Figure":
    return cf.Figure("t", "page.md", HEADER, lambda _args: "a line the script logs\n" + printed,
                     ignore_columns=1)


def _printed(bf16: str, ms: str = "3.40") -> str:
    return (f"{HEADER}\n|---|---|---:|---:|\n| fp32 | robust | 98.3% | 2.10 |\n"
            f"| bf16 parameters | robust | {bf16} | {ms} |\n")


@pytest.fixture
def page(tmp_path, monkeypatch):
    monkeypatch.setattr(cf, "ROOT", tmp_path)
    path = tmp_path / "page.md"
    path.write_text(PAGE)
    return path


def _args(write=False):
    return argparse.Namespace(write=write, demo_dir=None)


def test_a_current_table_passes_and_timings_do_not_count(page, capsys):
    assert cf.check(_figure(_printed("98.6%", ms="9.99")), _args())
    assert "is current" in capsys.readouterr().out
    assert page.read_text() == PAGE


def test_a_stale_table_is_named_with_its_rows(page, capsys):
    assert not cf.check(_figure(_printed("98.9%")), _args())
    out = capsys.readouterr().out
    assert "page.md is STALE" in out
    assert "-bf16 parameters | robust | 98.6%" in out and "+bf16 parameters | robust | 98.9%" in out
    assert page.read_text() == PAGE  # checking writes nothing


def test_write_replaces_the_table_and_nothing_else(page):
    assert cf.check(_figure(_printed("98.9%", ms="4.00")), _args(write=True))
    assert page.read_text() == PAGE.replace("| 98.6% | 3.40 |", "| 98.9% | 4.00 |")


def test_a_missing_table_fails(page, capsys):
    page.write_text("# no table here\n")
    assert not cf.check(_figure(_printed("98.6%")), _args())
    assert "no table headed" in capsys.readouterr().out


@pytest.mark.parametrize("figure", cf.FIGURES, ids=lambda f: f.name)
def test_every_covered_table_is_in_its_page(figure):
    rows = cf.table_at((ROOT / figure.page).read_text(), figure.header)
    assert rows is not None and len(rows) > 2, (figure.page, figure.header)
