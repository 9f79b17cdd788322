"""The README and docs/ as a reader copies them: every Python block runs as written (here the
ones that run in one process; tests/test_docs_ranks.py runs those on several ranks or with a
framework), and every command line names a `labpal-fast` subcommand with flags its parser
accepts, a `make` target the Makefile has, or a script that exists. How a block is marked to
run otherwise, or not at all: tests/doc_blocks.py."""
import contextlib
import functools
import io
import re
import shlex

import pytest

from doc_blocks import BLOCKS, IN_PROCESS, PAGES, PYTHON, ROOT, SHELL, block_id


def test_the_pages_have_python_blocks_to_run():
    # the README's example and the snippets of usage, frameworks, distributed, mixed precision
    assert len(PYTHON) >= 8 and any(b.page == "README.md" for b in IN_PROCESS)


@pytest.mark.parametrize("block", IN_PROCESS, ids=block_id)
def test_python_block_runs_as_written(block, tmp_path, monkeypatch):
    if block.marker:  # only `skip:` markers come here
        pytest.skip(f"{block_id(block)} marked in the markdown: {block.marker[1]}")
    monkeypatch.chdir(tmp_path)  # what a block writes stays out of the repository
    exec(compile(block.code, block_id(block), "exec"), {"__name__": "__main__"})


# ---- command lines ---------------------------------------------------------------------------

def _shell_commands(block):
    """Each command of a shell block as a token list: continuations joined, comments dropped,
    leading VAR=value assignments removed."""
    text = block.code.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        tokens = shlex.split(line, comments=True)
        while tokens and re.match(r"^\w+=", tokens[0]):
            tokens.pop(0)
        if tokens:
            out.append(tokens)
    return out


def _inline_commands(page):
    """`labpal-fast ...` and `make ...` written inline in the text (code spans may wrap)."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    spans = re.findall(r"`((?:labpal-fast|make) [^`]+)`", text.replace("\n", " "))
    return [shlex.split(span) for span in spans]


COMMANDS = [(block_id(b), tokens) for b in BLOCKS if b.lang in SHELL
            for tokens in _shell_commands(b)]
COMMANDS += [(str(p.relative_to(ROOT)), tokens) for p in PAGES for tokens in _inline_commands(p)]


def _labpal_args(tokens):
    """The arguments given to the `labpal-fast` command, or None when this is another command."""
    if tokens[0] == "labpal-fast":
        return tokens[1:]
    for i in range(len(tokens) - 1):  # python -m labpal_fast ..., torchrun ... -m labpal_fast ...
        if tokens[i] == "-m" and tokens[i + 1] == "labpal_fast":
            return tokens[i + 2:]
    return None


@functools.lru_cache(maxsize=None)
def _parser():
    from labpal_fast.cli import command

    return command.build_parser()


@functools.lru_cache(maxsize=None)
def _make_targets():
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", text, flags=re.M))


def _check(where, tokens):
    args = _labpal_args(tokens)
    if args is not None:
        if args and args[-1] == "...":  # "and more flags" in running text
            args = args[:-1]
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                _parser().parse_args(args)
            except SystemExit as exit_:
                assert exit_.code == 0 and "--help" in args, \
                    f"{where}: `labpal-fast {' '.join(args)}` is refused: {err.getvalue()}"
        return "labpal-fast"
    if tokens[0] == "make":
        missing = {t for t in tokens[1:] if "=" not in t and not t.startswith("-")} - _make_targets()
        assert not missing, f"{where}: `{' '.join(tokens)}`: no make target {sorted(missing)}"
        return "make"
    scripts = [t for t in tokens[1:2] if t.endswith(".py")] if "python" in tokens[0] else []
    for script in scripts:
        assert (ROOT / script).is_file(), f"{where}: `{' '.join(tokens)}`: no file {script}"
    return "script" if scripts else None


def test_every_command_line_names_what_exists():
    pytest.importorskip("sklearn")  # the command's parser imports its [cli] extra
    kinds = [_check(where, tokens) for where, tokens in COMMANDS]
    # the front page's two set-up commands and the command's own examples are among them
    assert kinds.count("make") >= 5 and kinds.count("labpal-fast") >= 10, kinds


def test_the_checks_refuse_a_wrong_flag_a_placeholder_and_a_missing_target():
    pytest.importorskip("sklearn")
    for tokens in (["labpal-fast", "train", "--no-such-flag"],
                   ["labpal-fast", "train", "--lr-multiplier-schedule", "0:1,N:0"],
                   ["labpal-fast", "train", "--sgd-rate", "paper|robust"],
                   ["make", "no-such-target"],
                   ["python", "tools/no_such_tool.py"]):
        with pytest.raises(AssertionError):
            _check("here", tokens)
