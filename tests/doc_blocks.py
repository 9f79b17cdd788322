"""The code blocks of the README and docs/, as a reader sees them (tests/test_docs.py and
tests/test_docs_ranks.py run them).

A comment just before a Python block says how it runs, visibly in the markdown:
`<!-- skip: REASON -->` (not run; reported as skipped with the reason), `<!-- needs: PACKAGE -->`
(run in its own process where PACKAGE is installed: frameworks keep global state; skipped
naming it otherwise), and `<!-- torchrun: N -->` (a script run on N local ranks with
`torch.distributed.run`: CPU, gloo). The others run in the test's process.
"""
import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import textwrap
from typing import NamedTuple, Optional

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*(skip|needs|torchrun):\s*(.+?)\s*-->\s*$")
SHELL = ("bash", "sh", "shell", "console")


class Block(NamedTuple):
    page: str      # path relative to the repository root
    line: int      # 1-based line of the opening fence
    lang: str
    code: str
    marker: Optional[tuple]  # (kind, argument) of the comment just before the fence


def _blocks(path: pathlib.Path):
    lines = path.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start = len(m.group(1)), m.group(2), i
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        code = textwrap.dedent("\n".join(lines[start + 1:end])) + "\n"
        prev = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(prev)
        out.append(Block(str(path.relative_to(ROOT)), start + 1, lang, code,
                         marker.groups() if marker else None))
        assert indent == len(lines[end]) - len(lines[end].lstrip()), (path, start + 1)
        i = end + 1
    return out


BLOCKS = [b for page in PAGES for b in _blocks(page)]
PYTHON = [b for b in BLOCKS if b.lang == "python"]
# run in the test's process (tests/test_docs.py) or in their own (tests/test_docs_ranks.py)
IN_PROCESS = [b for b in PYTHON if b.marker is None or b.marker[0] == "skip"]
OWN_PROCESS = [b for b in PYTHON if b not in IN_PROCESS]


def block_id(block):
    return f"{block.page}:{block.line}"


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


# torch's gloo teardown at interpreter exit (docs/distributed.md "Ending a run"): a worker thread
# frees the last collective's Python-holding state after the interpreter began to shut down, and
# the rank aborts with this message and SIGABRT. A run whose only failure is that abort is rerun.
GLOO_EXIT_ABORT = "terminate called without an active exception"
GLOO_EXIT_TRIES = 3


def _gloo_exit_abort(done) -> bool:
    out = done.stdout + done.stderr
    return (GLOO_EXIT_ABORT in out and "(SIGABRT)" in out
            and 'block.py", line' not in out)  # no Python error in the script itself


def run_script(block, tmp_path, launcher):
    script = tmp_path / "block.py"
    script.write_text(block.code)
    for _ in range(GLOO_EXIT_TRIES if launcher else 1):
        done = subprocess.run([sys.executable, *launcher, str(script)], cwd=tmp_path,
                              env=_env(), capture_output=True, text=True, timeout=300)
        if done.returncode == 0 or not _gloo_exit_abort(done):
            break
    assert done.returncode == 0, \
        f"{block_id(block)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def run_in_own_process(block, tmp_path):
    """Runs a block marked `needs:` or `torchrun:` in its own process(es); one whose package
    is absent is skipped, naming it."""
    kind, arg = block.marker
    if kind == "needs":
        if importlib.util.find_spec(arg) is None:
            pytest.skip(f"{block_id(block)} needs {arg} (the [integrations] extra), not installed")
        return run_script(block, tmp_path, [])
    assert kind == "torchrun", block.marker
    run_script(block, tmp_path, ["-m", "torch.distributed.run", "--standalone",
                                 f"--nproc-per-node={int(arg)}"])
