"""The hyper-parameters are written once, in LABPAL.__init__'s signature: `Hyper`, the class
docstring's Args, the hyper-parameter table of docs/usage.md and the command's flags must name the same ones with the
same defaults (a test that fails when one of them drifts)."""
import ast
import dataclasses
import inspect
import pathlib
import re

import pytest
import torch

from labpal_fast import LABPAL
from labpal_fast.hyper import NAMES, Hyper

ROOT = pathlib.Path(__file__).resolve().parents[1]
# LABPAL's own keyword arguments that are not hyper-parameters of the line search
OWN = ("backend", "model", "process_group", "weight_decay")


def _keywords():
    sig = inspect.signature(LABPAL)
    return {n: p for n, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def test_the_signature_lists_every_hyper_parameter_with_its_default_and_type():
    keywords = _keywords()
    assert tuple(n for n in keywords if n not in OWN) == NAMES
    for field in dataclasses.fields(Hyper):
        param = keywords[field.name]
        assert param.default == field.default and type(param.default) is type(field.default), \
            field.name
        assert param.annotation == field.type, field.name  # both as written (strings)
    # a call naming no hyper-parameter builds the defaults
    net = torch.nn.Linear(3, 2)
    assert LABPAL(net.parameters()).hyper == Hyper()


def test_an_unknown_keyword_is_refused_naming_it():
    net = torch.nn.Linear(3, 2)
    with pytest.raises(TypeError, match=r"unknown hyper-parameter\(s\) \['learning_rate'\]"):
        LABPAL(net.parameters(), learning_rate=0.1)


def test_the_class_docstring_names_every_argument_in_order():
    doc = inspect.getdoc(LABPAL)
    args = doc[doc.index("\nArgs"):]
    named = re.findall(r"^    (\w+): ", args, flags=re.MULTILINE)
    assert named == ["params", *_keywords()]


def _docs_table():
    """(name, default) per row of docs/usage.md's hyper-parameter table, in order."""
    text = (ROOT / "docs" / "usage.md").read_text()
    section = text[text.index("## Hyper-parameters"):]
    rows = [line for line in section.splitlines()[1:] if line.startswith("| `")]
    out = []
    for row in rows:
        names, defaults = row.split(" | ")[:2]
        names = re.findall(r"`(\w+)`", names)
        defaults = [ast.literal_eval(d) for d in re.findall(r"`([^`]+)`", defaults)]
        assert len(names) == len(defaults), row
        out += zip(names, defaults)
    return out


def test_the_docs_table_lists_every_hyper_parameter_with_its_default():
    assert _docs_table() == [(name, getattr(Hyper(), name)) for name in NAMES]


def test_the_command_has_a_flag_for_every_hyper_parameter():
    pytest.importorskip("sklearn")
    from labpal_fast.cli import command

    for name in ("train", "compare"):
        parser = command.build_parser()
        sub = parser._subparsers._group_actions[0].choices[name]
        flags = {a.dest: a for a in sub._actions}
        for hyper in NAMES:
            if hyper in command._HYPER_SKIP:
                continue
            action = flags["hp_" + hyper]
            assert "--" + hyper.replace("_", "-") in action.option_strings
            # LABPAL's default, or what the command passes instead (said so in --help)
            shown = command._HYPER_CLI_DEFAULTS.get(hyper, repr(getattr(Hyper(), hyper)))
            assert action.help == f"default {shown}"
