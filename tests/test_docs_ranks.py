"""The README's and docs/' Python blocks that run on several ranks (`<!-- torchrun: N -->`, CPU,
gloo) or with a framework (`<!-- needs: PACKAGE -->`), each as a script in its own process,
as written (tests/doc_blocks.py). Part of `make test-all`, beside the other multi-rank and
framework suites."""
import pytest

from doc_blocks import OWN_PROCESS, _gloo_exit_abort, block_id, run_in_own_process


def test_the_pages_have_multi_rank_and_framework_blocks():
    kinds = {b.marker[0] for b in OWN_PROCESS}
    assert kinds == {"needs", "torchrun"}, kinds


@pytest.mark.parametrize("block", OWN_PROCESS, ids=block_id)
def test_block_runs_as_written_in_its_own_process(block, tmp_path):
    run_in_own_process(block, tmp_path)


def test_only_gloos_abort_at_exit_is_rerun():
    from types import SimpleNamespace as Done
    abort = ("terminate called without an active exception\n"
             "  exitcode  : -6 (pid: 8277)  (SIGABRT)\n")
    assert _gloo_exit_abort(Done(stdout="", stderr=abort))
    error = 'File "/tmp/t/block.py", line 9, in <module>\nValueError: lr\n'
    assert not _gloo_exit_abort(Done(stdout="", stderr=abort + error))
    assert not _gloo_exit_abort(Done(stdout="", stderr="exitcode  : -6 (pid: 1)  (SIGABRT)\n"))
