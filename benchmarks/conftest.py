"""Benchmarks live in bench_*.py files: collect them with `pytest benchmarks` (files named on
the command line are collected by pytest itself)."""
import pytest


def pytest_collect_file(parent, file_path):
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
