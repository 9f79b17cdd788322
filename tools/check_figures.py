"""`make check-figures`: rerun (or re-render from committed raw results) the tools behind the
documentation's tables and name every table that no longer matches what its tool prints now.

    PYTHONPATH=$PWD python tools/check_figures.py [--only NAME ...] [--cheap] [--write] [--list]

A figure is a Markdown table in a page, found by its header line, or the lines between
`<!-- figure: NAME -->` and `<!-- /figure: NAME -->` in a page (the quality suite's reports),
and the command that prints it. A figure that differs is printed row by row with the page, the
line, the documented (-) and the printed (+) value, and the exit code is 1; `--write` puts the
fresh lines into the page instead (and, for the demo, copies its two pictures to docs/). Columns
of timings are left out of the comparison (they depend on the machine and its load).

Cheap figures (seconds: tests/test_check_figures.py checks them too) are re-rendered from raw
results committed beside the documentation: the quality suite's reports from the
benchmarks/suite/report*.jsonl records that `labpal-fast suite` writes (OUT/report.jsonl), SGD
mode's rates from benchmarks/sgd_rate/runs.jsonl (tools/sgd_rate_table.py --record), and the
memory per parameter is measured. The others rerun their script: the demo (about 70 s on an
idle 2-core machine; `--demo-dir runs/digits-demo` reads the run `make demo` left instead), the
low- and mixed-precision digits runs, the line accuracy and the gradient noise (a minute or two
each). `--list` names every figure and every table of the pages that is not one (NOT_FIGURES,
with the reason); tests/test_check_figures.py fails on a table in README.md or docs/ that is in
neither.

A new suite run into the pages: `make suite-labpal` (or any `labpal-fast suite ... --out OUT`),
then `cp OUT/report.jsonl benchmarks/suite/report.jsonl` and `python tools/check_figures.py
--only suite-results quality-targets --write` (docs/suite_results.md is the whole report,
docs/quality.md the targets table and the list under it); commit the record with the pages.
SGD mode's rates: `python tools/sgd_rate_table.py --out runs/sgd_rate`, then `cp
runs/sgd_rate/runs.jsonl benchmarks/sgd_rate/runs.jsonl` and `--only sgd-rate --write`.
"""
from __future__ import annotations

import argparse
import difflib
import pathlib
import shutil
import subprocess
import sys
import tempfile
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

ROOT = pathlib.Path(__file__).resolve().parents[1]


class Figure(NamedTuple):
    name: str
    page: str                  # relative to the repository root
    header: Optional[str]      # the table's first line, as in the page and in the output;
    #                            None: the lines between the figure's markers in the page
    produce: Callable[[argparse.Namespace], str]  # runs the tool, returns its output
    ignore_columns: int = 0    # trailing columns left out of the comparison (timings)
    cheap: bool = False        # seconds: the tests check it too


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


def suite_part(report: str, part: str) -> str:
    """A part of a quality suite report (suite.md): "report" all of it, "targets" what its
    "## Targets" section holds, "targets-table" that section's table and the list under it."""
    lines = report.strip().splitlines()
    if part == "report":
        return "\n".join(lines)
    first = lines.index("## Targets") + 2
    last = lines.index("## Per task")
    if part == "targets-table":
        first = next(i for i in range(first, last) if lines[i].startswith("| task |"))
        bullets = next(i for i in range(first, last) if lines[i].startswith("- "))
        last = next(i for i in range(bullets, last) if not lines[i].startswith("- "))
    return "\n".join(lines[first:last]).strip()


def _suite(record: str, part: str) -> Callable[[argparse.Namespace], str]:
    """The report `labpal-fast suite` printed, rendered again from its committed record."""
    def produce(_args) -> str:
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        from labpal_fast.cli import suite_report
        return suite_part(suite_report.render_record(str(ROOT / record)), part)
    return produce


SUITE_RECORD = "benchmarks/suite/report.jsonl"   # the run behind docs/suite_results.md
# the run before reuse_updates=None (R = 1000 for every configuration), and the experiment with
# reuse_updates=200 for every configuration (results rows named <configuration>@r200)
BEFORE_REUSE = "benchmarks/suite/report-2026-12-07-before-reuse.jsonl"
# the run before m from the measured noise was bounded and counted momentum's share (2026-12-08)
BEFORE_NOISE_RULE = "benchmarks/suite/report-2026-12-08-before-noise-rule.jsonl"
FIGURES = [
    Figure("demo", "README.md",
           "| optimizer | val acc (final) | val loss (final) | steps to train loss ≤ 0.05 | "
           "ms/step | × SGD ms/step |", _demo, ignore_columns=2),
    Figure("low-precision", "docs/paper_and_quality.md",
           "| precision | line_fit | val accuracy | measurements with a rate |",
           _script("tools/low_precision_digits.py")),
    Figure("mixed-precision", "docs/mixed_precision.md", "| run | accuracy | test loss | valid |",
           _script("tools/mixed_precision_digits.py")),
    Figure("memory-per-parameter", "docs/mixed_precision.md",
           "| parameters | LABPAL, m = 1 | LABPAL, m > 1 | SGD + momentum | Adam |",
           _script("tools/memory_per_parameter.py"), cheap=True),
    Figure("line-accuracy", "docs/paper_and_quality.md",
           "| case | paper | paper fit + resolved positions | `\"gradient\"` slope | "
           "robust (default) |", _script("tools/line_accuracy.py", "--summary")),
    Figure("gradient-noise", "benchmarks/RESULTS.md",
           "| task | b | ν (paper) | step | B_simple | B_simple / b |",
           _script("tools/gradient_noise.py")),
    # (benchmarks/RESULTS.md keeps its dated table of 2026-12-05, as its other entries)
    Figure("sgd-rate", "docs/usage.md", "| task (figure) | sgd_rate | per seed 0, 1, 2 | mean | "
           "final train loss per seed | diverged runs | NaN/inf train losses |",
           _script("tools/sgd_rate_table.py", "--record", "benchmarks/sgd_rate/runs.jsonl"),
           cheap=True),
    Figure("suite-results", "docs/suite_results.md", None, _suite(SUITE_RECORD, "report"),
           cheap=True),
    Figure("quality-targets", "docs/quality.md", None, _suite(SUITE_RECORD, "targets-table"),
           cheap=True),
    Figure("quality-noise-rule-paired", "docs/quality.md", None,
           _script("tools/suite_paired.py", BEFORE_NOISE_RULE, SUITE_RECORD), cheap=True),
    Figure("quality-targets-before-noise-rule", "docs/quality.md", None,
           _suite(BEFORE_NOISE_RULE, "targets-table"), cheap=True),
    Figure("quality-reuse-paired", "docs/quality.md", None,
           _script("tools/suite_paired.py", BEFORE_REUSE, BEFORE_NOISE_RULE), cheap=True),
    Figure("quality-targets-before-reuse", "docs/quality.md", None,
           _suite(BEFORE_REUSE, "targets-table"), cheap=True),
    Figure("reuse-paired", "docs/algorithm.md", None,
           _script("tools/suite_paired.py", BEFORE_REUSE, "benchmarks/suite/reuse200.jsonl",
                   "--suffix", "@r200"), cheap=True),
    # the experiment with max_step_shrink=2 for the two momentum configurations (rows named
    # <configuration>@shrink2), paired against the suite record of the defaults it ran at
    Figure("max-step-shrink-paired", "docs/algorithm.md", None,
           _script("tools/suite_paired.py", BEFORE_NOISE_RULE,
                   "benchmarks/suite/max-step-shrink2.jsonl", "--suffix", "@shrink2"), cheap=True),
    Figure("quality-seed0", "docs/quality.md", None,
           _suite("benchmarks/suite/report-2026-12-07-seed0.jsonl", "targets"), cheap=True),
]

# The tables of README.md and docs/*.md that are no figure of a tool, or whose tool cannot
# rerun them: (page, header) -> why. tests/test_check_figures.py fails on a table in neither.
NOT_FIGURES = {
    ("README.md", "| page | sections |"): "a list of pages",
    ("docs/algorithm.md", "| task (figure) | config | before (seeds) | after (seeds) | paired Δ "
     "| Adam |"): "history: tools/probe_quality.py before and after a change of the code",
    ("docs/algorithm.md", "| task (figure, seed 0) | labpal before → after | labpal-sgd before "
     "→ after | labpal-m09 before → after | labpal-sgd-m09 before → after | Adam |"):
        "history: tools/probe_quality.py before and after a change of the code",
    ("docs/algorithm.md", "| rule | digits, batch 32 | spirals (batch 128) |"):
        "history: variants run through a temporary switch that is not in the code",
    ("docs/algorithm.md", "| where | paper / reference | here | why |"): "prose",
    ("docs/algorithm.md", "| design | 1M elements | 8M elements |"): "timings",
    ("docs/benchmarks.md", "| file | what |"): "a list of files",
    ("docs/benchmarks.md", "| model | LABPAL mode | step / AdamW(fused) | step / SGD(fused) | "
     "measurement ÷ floor | share, m = 1 | share, ν = 16 | syncs / TRAINING step |"):
        "timings on the GPU machine",
    ("docs/install.md", "| | declared | run in CI (`.ci/run`, CPU) | run once on the GPU "
     "machine (H200) |"): "prose",
    ("docs/paper_and_quality.md", "| task (figure) | LABPAL (NSGD) | LABPAL (SGD) | paper, NSGD "
     "| paper, SGD | Adam (1e-3) | SGD+momentum |"):
        "history: tools/quality_table.py at the defaults of 2026-12-05 (30 min; no raw results)",
    ("docs/paper_and_quality.md", "| charlm (val bits/char) | LABPAL (NSGD) | LABPAL (SGD) | "
     "paper, NSGD | paper, SGD | Adam (1e-3) | SGD+momentum |"):
        "history: tools/quality_table.py at the defaults of 2026-12-05 (30 min; no raw results)",
    ("docs/paper_and_quality.md", "| α | spirals NSGD / SGD (%) | digits b16 NSGD / SGD (%) | "
     "digits NSGD / SGD (%) | charlm NSGD / SGD (bits/char) |"):
        "history: hand-run `labpal-fast compare` at the defaults of 2026-12-05",
    ("docs/quality.md", "| task | data | model | batch | steps | weight decay | figure |"):
        "prose: the tasks",
    ("docs/quality.md", "| task | configuration | before: mean (seeds 0, 1, 2) | after | "
     "paired Δ |"): "history: suite runs before and after a change of the code",
    ("docs/quality.md", "| task | counts | parity reference | LABPAL NSGD: floor / parity | "
     "LABPAL NSGD β=0.9: floor / parity | LABPAL SGD: floor / parity | LABPAL SGD β=0.9: floor "
     "/ parity | NSGD vs tuned SGD | best untuned peer | NSGD vs it |"):
        "history (the last one, outside a figure's markers): the suite at the defaults of "
        "e788cf1, raw results not kept",
    ("docs/quality.md", "| optimizer | mean ± std | seeds | Δ vs Adam | Δ vs tuned SGD | "
     "diverged |"): "history: the suite at the defaults of e788cf1, raw results not kept",
    ("docs/usage.md", "| name | default | bounds | meaning |"):
        "the hyper-parameters (tests/test_signature.py checks their names and defaults)",
}


def table_at(text: str, header: str) -> Optional[List[str]]:
    """The rows of the Markdown table that starts with `header` (its line, stripped), header
    and separator included; None when there is none."""
    found = _table_span(text.splitlines(), header)
    return None if found is None else [line.strip() for line in text.splitlines()[slice(*found)]]


def _table_span(lines: Sequence[str], header: str) -> Optional[Tuple[int, int]]:
    stripped = [line.strip() for line in lines]
    if header not in stripped:
        return None
    start = end = stripped.index(header)
    while end < len(lines) and stripped[end].startswith("|"):
        end += 1
    return start, end


def markers(name: str) -> Tuple[str, str]:
    return f"<!-- figure: {name} -->", f"<!-- /figure: {name} -->"


def _block_span(lines: Sequence[str], name: str) -> Optional[Tuple[int, int]]:
    begin, end = markers(name)
    stripped = [line.strip() for line in lines]
    if begin not in stripped or end not in stripped:
        return None
    return stripped.index(begin) + 1, stripped.index(end)


def span(figure: Figure, lines: Sequence[str]) -> Optional[Tuple[int, int]]:
    """[first, last) of the figure's lines in the page's lines; None when it is not there."""
    if figure.header is None:
        return _block_span(lines, figure.name)
    return _table_span(lines, figure.header)


def _printed(figure: Figure, output: str) -> Optional[List[str]]:
    if figure.header is None:
        return output.strip().splitlines()
    return table_at(output, figure.header)


def _cells(row: str, ignore_columns: int) -> List[str]:
    cells = [c.strip() for c in row.strip().strip("|").split("|")]
    return cells[:len(cells) - ignore_columns] if ignore_columns else cells


def _compared(row: str, ignore_columns: int) -> str:
    return " | ".join(_cells(row, ignore_columns)) if row.strip().startswith("|") else row.strip()


def stale_lines(page: str, first_line: int, page_rows: Sequence[str],
                fresh_rows: Sequence[str], ignore_columns: int = 0) -> List[str]:
    """Each row that differs, as `page:line: -documented` and `page:line: +printed`
    (`first_line`: the page's line number of page_rows[0]); empty when the page is current."""
    page_cells = [_compared(r, ignore_columns) for r in page_rows]
    fresh_cells = [_compared(r, ignore_columns) for r in fresh_rows]
    out = []
    matcher = difflib.SequenceMatcher(None, page_cells, fresh_cells, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        out += [f"{page}:{first_line + i}: -{page_cells[i]}" for i in range(i1, i2)]
        out += [f"{page}:{first_line + i1}: +{fresh_cells[j]}" for j in range(j1, j2)]
    return out


def check(figure: Figure, args) -> bool:
    page = ROOT / figure.page
    text = page.read_text()
    lines = text.splitlines(keepends=True)
    where = span(figure, lines)
    if where is None:
        what = f"table headed {figure.header!r}" if figure.header else \
            "lines between the markers " + " and ".join(markers(figure.name))
        print(f"{figure.name}: no {what} in {figure.page}")
        return False
    try:
        fresh = _printed(figure, figure.produce(args))
    except (RuntimeError, OSError, ValueError, subprocess.CalledProcessError) as e:
        # the tool failed: the other figures are still checked
        print(f"{figure.name}: {e}")
        return False
    if not fresh:
        print(f"{figure.name}: the tool printed no table headed {figure.header!r}")
        return False
    first, last = where
    stale = stale_lines(figure.page, first + 1, lines[first:last], fresh, figure.ignore_columns)
    if not stale:
        print(f"{figure.name}: {figure.page} is current")
        return True
    if args.write:
        page.write_text("".join(lines[:first] + [row + "\n" for row in fresh] + lines[last:]))
        print(f"{figure.name}: {figure.page} rewritten")
        return True
    print(f"{figure.name}: {figure.page} is STALE (- documented, + printed now):\n"
          + "\n".join(stale))
    return False


def list_figures() -> None:
    for f in FIGURES:
        print(f"{f.name}: {f.page}{'' if f.header else ' (between its markers)'}"
              f"{', cheap' if f.cheap else ''}")
    for (page, header), why in NOT_FIGURES.items():
        print(f"not checked: {page} {header[:60]}...: {why}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=[f.name for f in FIGURES])
    ap.add_argument("--cheap", action="store_true", help="only the figures that take seconds")
    ap.add_argument("--write", action="store_true", help="put the fresh tables into the pages")
    ap.add_argument("--list", action="store_true", help="name the figures and the tables that "
                    "are none, and stop")
    ap.add_argument("--demo-dir", help="a finished `make demo` run to read instead of running it")
    args = ap.parse_args(argv)
    if args.list:
        list_figures()
        return 0
    chosen = [f for f in FIGURES if (not args.only or f.name in args.only)
              and (f.cheap or not args.cheap)]
    results = [check(f, args) for f in chosen]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
