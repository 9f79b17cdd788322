"""The command apart from the core: the optimizer trains without any of the command's packages,
and the command without them stops at once, naming them and the fix.

"Not installed" is made real in a child process: `HIDE` puts a finder in place of Python's
PathFinder that does not see the hidden packages, so `import` raises ModuleNotFoundError and
`importlib.util.find_spec` returns None, exactly as when they are absent. It also notes which
module tried to import each one, since torch itself tries numpy, tqdm and scikit-learn (and
does without them)."""
import json
import subprocess
import sys

import pytest
import torch

from labpal_fast import ops

HIDE = '''
import sys
from importlib.machinery import PathFinder

HIDDEN = set(sys.argv[1].split(","))
ASKED = []   # (hidden package, the module whose import asked for it)


def importer():
    frame = sys._getframe(2)
    while frame.f_globals.get("__name__", "").partition(".")[0] == "importlib":
        frame = frame.f_back
    return frame.f_globals.get("__name__", "")


class Uninstalled(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            ASKED.append((name, importer()))
            return None
        return super().find_spec(name, path, target)


sys.meta_path[sys.meta_path.index(PathFinder)] = Uninstalled
'''

TRAIN = '''
import json
import torch
import labpal_fast

torch.manual_seed(0)
device = torch.device(sys.argv[3])
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(device)
x, y = torch.randn(64, 8, device=device), torch.randint(0, 3, (64,), device=device)
opt = labpal_fast.LABPAL(model.parameters(), model=model, backend=sys.argv[2], dataset_size=64,
                         batch_size=64)
losses = [float(opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y)))
          for _ in range(40)]
print(json.dumps({
    "backend": opt.backend, "updates": int(opt.updates), "first": losses[0], "last": losses[-1],
    "asked_by_labpal_fast": [n for n, by in ASKED if by.partition(".")[0] == "labpal_fast"],
    "cli_modules": [m for m in sys.modules
                    if m == "labpal_fast.cli" or m.startswith("labpal_fast.cli.")],
}))
'''

CLI_ONLY = ("numpy", "matplotlib", "sklearn", "tqdm")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("backend", ["eager", "ext", "triton"])
def test_the_optimizer_trains_without_the_cli_packages(backend):
    """numpy, matplotlib, scikit-learn and tqdm are all hidden: torch 2.13 imports and trains
    without numpy (it warns, and does without). Triton itself imports numpy, so for the triton
    backend numpy stays visible; the eager and ext runs show that labpal_fast's own modules
    need no numpy (ops.triton is checked by the other three hidden packages only)."""
    reason = ops.why_unavailable(backend, [DEVICE])
    if reason is not None:
        pytest.skip(f"backend {backend} on {DEVICE}: {reason}")
    hidden = [p for p in CLI_ONLY if not (backend == "triton" and p == "numpy")]
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", HIDE + TRAIN, ",".join(hidden),
                           backend, str(DEVICE)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["backend"] == backend
    assert got["updates"] > 0 and got["last"] < got["first"]
    assert got["asked_by_labpal_fast"] == []
    assert got["cli_modules"] == []


COMMAND = '''
import runpy
sys.argv = ["labpal-fast"] + sys.argv[2:]
runpy.run_module("labpal_fast", run_name="__main__", alter_sys=True)
'''


@pytest.mark.parametrize("hidden, named", [("matplotlib", "matplotlib"), ("tqdm", "tqdm"),
                                           ("sklearn", "scikit-learn"),
                                           ("numpy,matplotlib", "numpy, matplotlib")])
def test_the_command_without_the_cli_extra_stops_before_training(tmp_path, hidden, named):
    out = tmp_path / "run"
    # -W ignore: without numpy, torch warns when imported, before the command begins
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", HIDE + COMMAND, hidden, "train",
                           "--task", "digits", "--steps", "50", "--quiet", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"labpal-fast needs {named} (missing): pip install {named.replace(', ', ' ')} "
        "(or install the clone with its [cli] extra: pip install '.[cli]')"]
    # it stopped before training: training makes --out first and prints a table last
    assert proc.stdout == "" and not out.exists()
