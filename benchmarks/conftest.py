"""Benchmarks live in bench_*.py files: collect them with `pytest benchmarks` (files named on
the command line are collected by pytest itself). Their tables (benchmarks/summary.py) are
printed again at the end of the run, so that `pytest benchmarks -q` shows what it measured."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import summary  # noqa: E402


def pytest_collect_file(parent, file_path):
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_terminal_summary(terminalreporter):
    tr = terminalreporter
    tr.section("benchmark tables (benchmarks/summary.py)")
    if summary.TABLES:
        for block in summary.TABLES:
            tr.write_line(block + "\n")
    else:
        tr.write_line("no table was made: every benchmark that makes one was skipped or "
                      "deselected")
    skipped = len(tr.stats.get("skipped", []))
    if skipped:
        tr.write_line(f"{skipped} skipped: they need what this machine lacks (a GPU, the compiled "
                      "extension, several processes); `-rs` lists each reason")
    if "--benchmark-disable" in " ".join(tr.config.invocation_params.args) or \
            getattr(tr.config.option, "benchmark_disable", False):
        tr.write_line("pytest-benchmark's own timing tables are off (--benchmark-disable, the "
                      "default here): `make bench` turns them on")
