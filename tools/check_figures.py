"""`make check-figures`: rerun the scripts behind the documentation's tables and name every table
that no longer matches what its script prints now.

    PYTHONPATH=$PWD python tools/check_figures.py [--only NAME ...] [--write] [--demo-dir DIR]

Each figure below is a Markdown table in a page and the command that prints it (found in the
command's output by the table's header line). A table whose rows differ is printed as a diff
and the exit code is 1; `--write` puts the fresh rows into the page instead (and, for the demo,
copies its two pictures to docs/). Columns of timings are left out of the comparison (they
depend on the machine and its load). The demo's run takes about 70 s on an idle 2-core machine
(`--demo-dir runs/digits-demo` reads the run `make demo` left instead), the others a minute or
two each.

Not covered (hours of training or tables summarized by hand from a script's output): the
quality tables (tools/quality_table.py), SGD mode's (tools/sgd_rate_table.py), the α table, the
line-accuracy table (tools/line_accuracy.py), memory per parameter
(tools/memory_per_parameter.py) and the suite's (docs/quality.md, `labpal-fast suite`).
"""
from __future__ import annotations

import argparse
import difflib
import pathlib
import shutil
import subprocess
import sys
import tempfile
from typing import Callable, List, NamedTuple, Optional, Sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]


class Figure(NamedTuple):
    name: str
    page: str                  # relative to the repository root
    header: str                # the table's first line, as in the page and in the output
    produce: Callable[[argparse.Namespace], str]  # runs the script, returns its output
    ignore_columns: int = 0    # trailing columns left out of the comparison (timings)


def _script(*argv: str) -> Callable[[argparse.Namespace], str]:
    def produce(_args) -> str:
        done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stderr[-2000:]}")
        return done.stdout
    return produce


def _demo(args) -> str:
    """The table of `make demo`'s run (labpal-fast compare --task digits, the Makefile's
    command): read from --demo-dir, or run afresh into a temporary directory."""
    out = pathlib.Path(args.demo_dir) if args.demo_dir else pathlib.Path(tempfile.mkdtemp())
    if not args.demo_dir:
        subprocess.run([sys.executable, "-m", "labpal_fast", "compare", "--task", "digits",
                        "--quiet", "--out", str(out)], cwd=ROOT, check=True)
    if args.write:  # the pictures go with the table
        shutil.copy(out / "loss_lr.png", ROOT / "docs" / "digits_compare.png")
        shutil.copy(out / "lines_labpal.png", ROOT / "docs" / "digits_lines.png")
    return (out / "results.md").read_text()


FIGURES = [
    Figure("demo", "README.md",
           "| optimizer | val acc (final) | val loss (final) | steps to train loss ≤ 0.05 | "
           "ms/step | × SGD ms/step |", _demo, ignore_columns=2),
    Figure("low-precision", "docs/paper_and_quality.md",
           "| precision | line_fit | val accuracy | measurements with a rate |",
           _script("tools/low_precision_digits.py")),
    Figure("mixed-precision", "docs/mixed_precision.md", "| run | accuracy | valid |",
           _script("tools/mixed_precision_digits.py")),
]


def table_at(text: str, header: str) -> Optional[List[str]]:
    """The rows of the Markdown table that starts with `header` (its line, stripped), header
    and separator included; None when there is none."""
    lines = [line.strip() for line in text.splitlines()]
    if header not in lines:
        return None
    start = lines.index(header)
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return lines[start:end]


def _cells(row: str, ignore_columns: int) -> List[str]:
    cells = [c.strip() for c in row.strip().strip("|").split("|")]
    return cells[:len(cells) - ignore_columns] if ignore_columns else cells


def stale_rows(page_rows: Sequence[str], fresh_rows: Sequence[str], ignore_columns: int = 0):
    """A unified diff of the compared cells, empty when the page's table is current."""
    page = [" | ".join(_cells(r, ignore_columns)) for r in page_rows]
    fresh = [" | ".join(_cells(r, ignore_columns)) for r in fresh_rows]
    return list(difflib.unified_diff(page, fresh, "in the page", "printed now", lineterm=""))


def replace_table(text: str, header: str, fresh_rows: Sequence[str]) -> str:
    lines = text.splitlines(keepends=True)
    stripped = [line.strip() for line in lines]
    start = stripped.index(header)
    end = start
    while end < len(lines) and stripped[end].startswith("|"):
        end += 1
    return "".join(lines[:start] + [row + "\n" for row in fresh_rows] + lines[end:])


def check(figure: Figure, args) -> bool:
    page = ROOT / figure.page
    text = page.read_text()
    rows = table_at(text, figure.header)
    if rows is None:
        print(f"{figure.name}: no table headed {figure.header!r} in {figure.page}")
        return False
    fresh = table_at(figure.produce(args), figure.header)
    if fresh is None:
        print(f"{figure.name}: the script printed no table headed {figure.header!r}")
        return False
    diff = stale_rows(rows, fresh, figure.ignore_columns)
    if not diff:
        print(f"{figure.name}: {figure.page} is current")
        return True
    if args.write:
        page.write_text(replace_table(text, figure.header, fresh))
        print(f"{figure.name}: {figure.page} rewritten")
        return True
    print(f"{figure.name}: {figure.page} is STALE:\n" + "\n".join(diff))
    return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=[f.name for f in FIGURES])
    ap.add_argument("--write", action="store_true", help="put the fresh tables into the pages")
    ap.add_argument("--demo-dir", help="a finished `make demo` run to read instead of running it")
    args = ap.parse_args(argv)
    chosen = [f for f in FIGURES if not args.only or f.name in args.only]
    results = [check(f, args) for f in chosen]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
