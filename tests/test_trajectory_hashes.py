"""tools/trajectory_hashes.py: the same output on every run, and a hash that moves when the
trajectory does (one hyper-parameter changed), or when one bit of a tensor does."""
import math
import os
import re
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "trajectory_hashes.py")
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))


def _python(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_same_output_twice_and_skips_named(tmp_path):
    only = ["--only", "momentum=0.9/m=3/bf16-master"]  # eager and ext run, Triton skips bf16
    first = _python(TOOL, *only, "--out", str(tmp_path / "a.txt"))
    second = _python(TOOL, *only)
    assert first == second == (tmp_path / "a.txt").read_text()
    lines = first.splitlines()
    names = [line.split(" ")[0] for line in lines]
    assert names == [f"{b}/{mode}/momentum=0.9/m=3/bf16-master"
                     for b in ("eager", "ext", "triton") for mode in ("NSGD", "SGD")], names
    hashes = [line.split(" ")[1] for line in lines if " skipped: " not in line]
    assert len(hashes) == 4 and all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), lines
    assert len(set(hashes)) == 4, lines  # NSGD and SGD differ
    skipped = [line for line in lines if " skipped: " in line]
    assert [s.split(" ")[0] for s in skipped] == [n for n in names if n.startswith("triton")]
    assert all("bf16" in s for s in skipped), skipped


def _tool():
    """The tool as a module (it sets TRITON_INTERPRET for its own runs: put back as it was)."""
    saved = os.environ.get("TRITON_INTERPRET")
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import trajectory_hashes
    finally:
        sys.path.remove(os.path.join(ROOT, "tools"))
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return trajectory_hashes


def test_a_changed_hyper_parameter_changes_the_hash():
    """line_fit="gradient" takes the slope from the averaged gradient: another line, other steps."""
    single = _tool().single
    default = single("eager", "NSGD", 0.0, 1, "fp32")
    assert single("eager", "NSGD", 0.0, 1, "fp32") == default
    changed = single("eager", "NSGD", 0.0, 1, "fp32", line_fit="gradient")
    for part in ("params", "state_dict", "measurements"):
        assert default[part] != changed[part], part


def test_digest_is_canonical_and_sees_one_bit():
    digest = _tool().digest
    g = torch.Generator().manual_seed(0)
    t = torch.randn(5, generator=g)
    state = {"state": {0: {"direction": t}}, "lr": 0.1, "records": [{"a": float("nan")}]}
    same = {"records": [{"a": float("nan")}], "lr": 0.1, "state": {0: {"direction": t.clone()}}}
    assert digest(state) == digest(same)  # key order does not matter, NaN equals NaN
    bumped = t.clone()
    bumped[3] = torch.nextafter(bumped[3], torch.tensor(float("inf")))
    assert digest(state) != digest({**state, "state": {0: {"direction": bumped}}})
    assert digest(t) != digest(t.double())  # dtype
    assert digest(t) != digest(t.reshape(5, 1))  # shape
    assert digest([0.1]) != digest([math.nextafter(0.1, 1.0)]) != digest((0.1,))
