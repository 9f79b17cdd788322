"""tools/check_figures.py (`make check-figures`): a table that its script no longer prints is
named with its changed rows (page and line), a current one passes, timing columns do not count,
and `--write` replaces the table and nothing else; the same for the lines between a figure's
markers. Every table it covers is found in its page, every cheap figure (re-rendered from
committed raw results, or measured in seconds) is current, and every table of README.md and
docs/ is a figure or named as none, with the reason."""
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


BLOCK_PAGE = """# Suite

<!-- figure: t -->
Floor: the text of the report.

- NSGD: floor met on 10 of 11 tasks.
<!-- /figure: t -->

After.
"""


def _block(printed: str) -> "cf.Figure":
    return cf.Figure("t", "page.md", None, lambda _args: printed)


def test_a_current_block_passes_and_a_stale_one_is_named_with_its_line(page, capsys):
    page.write_text(BLOCK_PAGE)
    assert cf.check(_block("Floor: the text of the report.\n\n- NSGD: floor met on 10 of 11 "
                           "tasks.\n"), _args())
    assert not cf.check(_block("Floor: the text of the report.\n\n- NSGD: floor met on 9 of 11 "
                               "tasks."), _args())
    out = capsys.readouterr().out
    assert "page.md:6: -- NSGD: floor met on 10 of 11 tasks." in out
    assert "page.md:6: +- NSGD: floor met on 9 of 11 tasks." in out
    assert page.read_text() == BLOCK_PAGE


def test_write_replaces_the_lines_between_the_markers_and_nothing_else(page):
    page.write_text(BLOCK_PAGE)
    assert cf.check(_block("Floor: new.\n\n- NSGD: floor met on 9 of 11 tasks.\n- more.\n"),
                    _args(write=True))
    assert page.read_text() == BLOCK_PAGE.replace(
        "Floor: the text of the report.\n\n- NSGD: floor met on 10 of 11 tasks.\n",
        "Floor: new.\n\n- NSGD: floor met on 9 of 11 tasks.\n- more.\n")


def test_a_page_without_the_markers_or_a_failing_tool_fails(page, capsys):
    assert not cf.check(_block("anything"), _args())
    assert "<!-- figure: t -->" in capsys.readouterr().out
    page.write_text(BLOCK_PAGE)

    def broken(_args):
        raise RuntimeError("tools/x.py failed: boom")
    assert not cf.check(cf.Figure("t", "page.md", None, broken), _args())
    assert "tools/x.py failed: boom" in capsys.readouterr().out


def test_a_current_table_passes_and_timings_do_not_count(page, capsys):
    assert cf.check(_figure(_printed("98.6%", ms="9.99")), _args())
    assert "is current" in capsys.readouterr().out
    assert page.read_text() == PAGE


def test_a_stale_table_is_named_with_its_rows(page, capsys):
    assert not cf.check(_figure(_printed("98.9%")), _args())
    out = capsys.readouterr().out
    assert "page.md is STALE" in out
    assert "page.md:8: -bf16 parameters | robust | 98.6%" in out
    assert "page.md:8: +bf16 parameters | robust | 98.9%" in out
    assert "fp32" not in out   # the unchanged row is not named
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
    where = cf.span(figure, (ROOT / figure.page).read_text().splitlines())
    assert where is not None and where[1] - where[0] > 2, (figure.page, figure.name)


@pytest.mark.parametrize("figure", [f for f in cf.FIGURES if f.cheap], ids=lambda f: f.name)
def test_every_cheap_figure_is_current(figure, capsys):
    assert cf.check(figure, _args()), capsys.readouterr().out


def _tables(text):
    """The header line of every Markdown table in the text, with whether it lies between a
    figure's markers."""
    found, inside, previous = [], False, ""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("<!-- figure: "):
            inside = True
        elif line.startswith("<!-- /figure: "):
            inside = False
        elif line.startswith("|") and not previous.startswith("|"):
            found.append((line, inside))
        previous = line
    return found


PAGES = ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))


@pytest.mark.parametrize("page", PAGES)
def test_every_table_of_the_pages_is_a_figure_or_named_as_none(page):
    covered = {f.header for f in cf.FIGURES if f.page == page}
    unknown = [header for header, inside in _tables((ROOT / page).read_text())
               if not inside and header not in covered and (page, header) not in cf.NOT_FIGURES]
    assert not unknown, f"{page}: tables no tool checks; add each to tools/check_figures.py's " \
        f"FIGURES (or NOT_FIGURES, with the reason): {unknown}"


def test_every_table_named_as_none_is_still_in_its_page():
    gone = [key for key in cf.NOT_FIGURES
            if key[1] not in [h for h, _ in _tables((ROOT / key[0]).read_text())]]
    assert not gone, gone
