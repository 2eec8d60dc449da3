"""A parity run's results: per-output comparisons, greedy-token checks, and their JSON / JUnit forms.

JUnit XML is what CI systems (GitHub, GitLab, Jenkins) render as test results, so every
comparison is one test case there: a failing output shows up by name without reading logs.
"""
from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET

from ..formats.atomic import atomic_output_file
from ..formats import jsonfile
from ..compare import Comparison
from ..dtypes import DTYPES



@dataclasses.dataclass
class OutputCheck:
    """One output of one graph, for one input case and one assignment of adapters to rows."""

    graph: str
    case: str
    scenario: str
    comparison: Comparison

    @property
    def output(self) -> str:
        return self.comparison.name

    @property
    def excess(self) -> float:
        """How far the worst position is past its bound (<= 0 passes); for ranking failures."""
        c = self.comparison
        return c.max_abs - (c.atol + c.rtol * abs(c.reference_at_worst))

    def line(self) -> str:
        return f"{self.graph} [{self.case}; {self.scenario}] {self.comparison.line()}"

    def as_dict(self) -> dict:
        return {"graph": self.graph, "case": self.case, "scenario": self.scenario, **self.comparison.as_dict()}


@dataclasses.dataclass
class GreedyCheck:
    """Greedy tokens over N steps: ONNX Runtime vs the reference, for one prompt row."""

    scenario: str
    row: int
    adapter: str | None
    reference: list[int]
    actual: list[int]
    passed: bool
    note: str = ""

    def line(self) -> str:
        verdict = "ok  " if self.passed else "FAIL"
        same = "identical" if self.reference == self.actual else "differ"
        return (f"{verdict} greedy [{self.scenario}] row {self.row} ({self.adapter or 'no adapter'}): "
                f"{len(self.reference)} tokens {same}" + (f"; {self.note}" if self.note else ""))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ParityReport:
    folder: str
    mode: str
    task: str
    model_type: str
    provider: str
    dtype: str
    reference_dtype: str
    tf32: bool | None
    atol: float
    rtol: float
    tolerance_note: str
    outputs: list[OutputCheck] = dataclasses.field(default_factory=list)
    greedy: list[GreedyCheck] = dataclasses.field(default_factory=list)
    quantization: dict | None = None  # the export's manifest entry; the reference then holds its de-quantized weights
    float_agreement: dict | None = None  # quantized exports: agreement with the float model (informs, never fails)
    runtime: str = "python"  # what ran the export: IA3Session, or "node" (ia3.mjs on onnxruntime-node)

    @property
    def passed(self) -> bool:
        return all(o.comparison.passed for o in self.outputs) and all(g.passed for g in self.greedy)

    def failures(self) -> list[OutputCheck | GreedyCheck]:
        failed = sorted((o for o in self.outputs if not o.comparison.passed), key=lambda o: -o.excess)
        return [*failed, *(g for g in self.greedy if not g.passed)]

    def worst_per_output(self) -> list[OutputCheck]:
        """For each (graph, output): the check closest to (or furthest past) its bound."""
        worst: dict[tuple[str, str], OutputCheck] = {}
        for o in self.outputs:
            key = (o.graph, o.output)
            if key not in worst or o.excess > worst[key].excess:
                worst[key] = o
        return list(worst.values())

    def header(self) -> str:
        tf32 = "" if self.tf32 is None else f", TF32 {'on' if self.tf32 else 'off'}"
        quantized = f", {self.quantization['method']}" if self.quantization else ""
        weights = " with the de-quantized weights" if self.quantization else ""
        return (f"parity: {self.model_type} {self.mode} export ({self.task}, {self.dtype}{quantized}) on {self.provider}{tf32}{' through ia3.mjs on onnxruntime-node' if self.runtime == 'node' else ''} "
                f"vs a {DTYPES[self.reference_dtype].numpy if self.reference_dtype in DTYPES else self.reference_dtype} PyTorch reference{weights}; "
                f"atol {self.atol:g}, rtol {self.rtol:g}")

    def agreement_line(self) -> str:
        """The float-model agreement of a quantized export ("" otherwise)."""
        a = self.float_agreement
        if not a:
            return ""
        counts = (f"{a['identical_rows']}/{a['rows']} rows identical over {a['tokens']} tokens" if "tokens" in a
                  else f"{a['rows']} rows")
        return f"agreement with the float model ({a['kind']}): {a['agreement']:.3f} ({counts}); informs, not a check"

    def summary(self) -> str:
        n_out, n_greedy = len(self.outputs), len(self.greedy)
        bad_out = sum(not o.comparison.passed for o in self.outputs)
        bad_greedy = sum(not g.passed for g in self.greedy)
        verdict = "PASS" if self.passed else "FAIL"
        return (f"{verdict}: {n_out - bad_out}/{n_out} output comparisons and {n_greedy - bad_greedy}/{n_greedy} "
                f"greedy-token checks passed")

    def as_dict(self) -> dict:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("outputs", "greedy")}
        return {**fields, "passed": self.passed,
                "worst_per_output": [o.as_dict() for o in self.worst_per_output()],
                "outputs": [o.as_dict() for o in self.outputs], "greedy": [g.as_dict() for g in self.greedy]}

    def write_json(self, path: str, force: bool = False, inputs=()) -> None:
        with atomic_output_file(path, force=force, inputs=inputs) as tmp:
            jsonfile.write_json(tmp, self.as_dict(), indent=2)  # strict JSON: an inf or NaN difference is null

    def write_junit(self, path: str, force: bool = False, inputs=()) -> None:
        suite = ET.Element("testsuite", name=f"ia3-export parity {self.model_type} {self.mode} {self.provider}",
                           tests=str(len(self.outputs) + len(self.greedy)), failures=str(len(self.failures())))
        for o in self.outputs:
            case = ET.SubElement(suite, "testcase", classname=f"parity.{o.graph}.{o.output}",
                                 name=f"{o.case}; {o.scenario}")
            if not o.comparison.passed:
                ET.SubElement(case, "failure", message=o.comparison.line())
        for g in self.greedy:
            case = ET.SubElement(suite, "testcase", classname="parity.greedy", name=f"{g.scenario}; row {g.row}")
            if not g.passed:
                ET.SubElement(case, "failure", message=g.line())
        root = ET.Element("testsuites")
        root.append(suite)
        with atomic_output_file(path, force=force, inputs=inputs) as tmp:
            ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=True)
