"""`ia3-export demo` fails loudly: a failed stage shows in the table's last line and the exit code.

The installed console script runs with a preload (run_cli's `sitecustomize`) that breaks the fold
for real and swaps the slow MiniLM and toy-LM stages for one that raises, so the check takes
seconds, not the full demo's minutes.
"""
from __future__ import annotations

from cli_helpers import assert_one_line_error, run_cli

BREAKAGE = '''
import torch

import ia3_export.examples.demo as demo
from ia3_export.errors import IA3Error
from ia3_export.core.model import IA3Model

fold = IA3Model.merge_and_unload


def corrupted_fold(self, *args, **kwargs):
    """A fold that gets one weight wrong, as a folding bug would."""
    model = fold(self, *args, **kwargs)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.endswith("v_proj.weight"))[0, 0] += 1.0
    return model


def exporter_stage(workdir, report, quick):
    raise IA3Error("the exporter is broken on purpose")


IA3Model.merge_and_unload = corrupted_fold
demo.STAGES = (demo.core_stage, exporter_stage)
'''


def test_failed_stages_show_in_the_last_line_and_the_exit_code(tmp_path):
    result = run_cli("demo", "--workdir", tmp_path / "demo", preload=BREAKAGE)
    line = assert_one_line_error(result, 1, "the demo failed 2 of 4 stages (fold into weights, exporter stage)")
    table = result.stdout.strip().splitlines()
    assert table[-1].split()[:2] == ["total", "FAIL"], table
    assert "2 of 4 stages failed: fold into weights, exporter stage;" in table[-1], (table[-1], line)
    rows = {r.split("  ")[0].strip(): r for r in table[-5:-1]}
    assert rows["add adapter"].split()[2] == "ok" and " FAIL " in rows["fold into weights"], table
    assert "stopped: IA3Error: the exporter is broken on purpose" in rows["exporter stage"], table


def test_a_passing_demo_says_so_in_the_last_line(tmp_path):
    """The same script with only the (real, unbroken) core stage: exit 0, `total ok`. Piped (as
    here), each stage is said once, in the table: the rows shown as stages end are for a terminal."""
    result = run_cli("demo", "--workdir", tmp_path / "demo", preload="import ia3_export.examples.demo as d\nd.STAGES = (d.core_stage,)\n")
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[-1].split()[:2] == ["total", "ok"] and "all 3 stages passed;" in lines[-1], lines[-1]
    for stage in ("add adapter", "fold into weights", "total"):
        assert sum(stage in line for line in lines) == 1, (stage, result.stdout)
