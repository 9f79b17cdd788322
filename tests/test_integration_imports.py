"""labpal_fast.integrations imports no framework; each adapter imports its own, and without it
raises ImportError naming the extra. Run in fresh interpreters (sys.modules untouched here)."""
import subprocess
import sys

import pytest

HEAVY = ("lightning", "transformers", "accelerate", "tensorboard")


def run(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)


def test_package_imports_no_framework():
    out = run("import sys, labpal_fast, labpal_fast.integrations\n"
              f"print([m for m in {HEAVY!r} if m in sys.modules])")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("adapter, blocked", [
    ("lightning", "lightning"), ("hf", "transformers"), ("hf", "accelerate"),
    ("tensorboard", "tensorboard"),
])
def test_missing_framework_names_the_extra(adapter, blocked):
    # a None entry in sys.modules makes `import blocked` raise ImportError, as if not installed
    out = run(f"import sys; sys.modules[{blocked!r}] = None\n"
              f"import labpal_fast.integrations.{adapter}")
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError:") and blocked in last
    assert "pip install 'labpal-fast[integrations]'" in last
