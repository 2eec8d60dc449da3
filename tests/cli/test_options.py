"""Every numeric option of every command is range-checked, and a value out of range is our one line
(exit 2), never click's usage block or an internal error. The commands are walked, so a new INT or
FLOAT option without a range fails here without this file being told."""
from __future__ import annotations

import click
import pytest

from cli_helpers import assert_one_line_error, run_cli
from ia3_export.cli import COMMANDS, _load
from ia3_export.cli.options import FloatRange, IntRange


def numeric_options():
    for name, (module, _) in COMMANDS.items():
        for param in _load(module).params:
            if isinstance(param.type, (click.types.IntParamType, click.types.FloatParamType)):
                yield name, param


def test_every_numeric_option_has_a_range():
    found = list(numeric_options())
    assert len(found) > 30  # generate, train, serve, parity, export
    unbounded = [f"{name} {param.opts[0]}" for name, param in found
                 if not isinstance(param.type, (IntRange, FloatRange))
                 or (param.type.min is None and param.type.max is None)]
    assert not unbounded, unbounded


@pytest.mark.parametrize("name, flag", [(n, p.opts[0]) for n, p in numeric_options()])
def test_a_value_out_of_range_is_one_line_naming_the_option_and_its_range(name, flag):
    """Parsed before any work: the folders need not exist. Each option gets a value past its range."""
    param = next(p for n, p in numeric_options() if n == name and p.opts[0] == flag)
    low, high = param.type.min, param.type.max
    value = str(low - 1) if low is not None else str(high * 2 + 1)
    if isinstance(param.type, FloatRange) and low is not None and not param.type.min_open:
        value = str(float(low) - 1.0)
    args = {"train": ["m", "--data", "d", "--task", "text-generation", "--out", "o"], "merge": ["m", "a", "--out", "o"],
            "parity": ["m", "o"], "export": ["m", "--out", "o"], "convert": ["a", "m", "--out", "o.onnx_adapter"],
            "generate": ["o", "--prompt", "hi"], "serve": ["o"]}.get(name, [])
    result = run_cli(name, *args, flag, value)
    assert_one_line_error(result, 2, f"{flag} is ")
    assert "give a " in result.stderr and " in the range " in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--seed", "-1"], "--seed is -1; give a whole number in the range 0<=x<=4294967295"),
    (["--temperature", "nan"], "--temperature is nan; give a finite number in the range x>0"),
    (["--temperature", "0"], "--temperature is 0.0; give a finite number in the range x>0"),
    (["--top-p", "1.5"], "--top-p is 1.5; give a finite number in the range 0<x<=1"),
    (["--max-new-tokens", "abc"], "--max-new-tokens is 'abc'; give a whole number in the range 1<=x<=2147483647"),
])
def test_generate_numbers_out_of_range(args, message):
    assert_one_line_error(run_cli("generate", "nowhere", "--prompt", "hi", *args), 2, message)
