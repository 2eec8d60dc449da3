"""Bad training input: one line naming the file (and line) and the fix, exit 2, nothing written."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from cli_helpers import run_cli


@pytest.fixture(scope="module")
def bert(model_dir):
    return model_dir("bert", "feature-extraction")


def write(path, text: str | bytes) -> str:
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    return str(path)


GOOD = "".join(json.dumps({"text": f"row {i}", "label": ["a", "b"][i % 2]}) + "\n" for i in range(6))

CASES = {
    "missing file": (lambda d: str(d / "nope.jsonl"), None, "nope.jsonl does not exist"),
    "malformed json": (lambda d: write(d / "bad.jsonl", GOOD + '{"text": "x", "label": \n'), None, "bad.jsonl:7: not valid JSON"),
    "not an object": (lambda d: write(d / "list.jsonl", GOOD + "[1, 2]\n"), None, "list.jsonl:7: expected a JSON object"),
    "row without field": (lambda d: write(d / "nolabel.jsonl", GOOD + '{"text": "x"}\n'), None,
                          "nolabel.jsonl:7: the row needs 'text' + 'label' for text-classification (its fields: text)"),
    "csv row with an empty field": (lambda d: write(d / "rows.csv", "text,label\nhello,a\nworld,\n"), None,
                                    "rows.csv:3: field 'label' is an empty string; text-classification needs 'label' as a "
                                    "non-empty string or a number"),
    "field of the wrong type": (lambda d: write(d / "types.jsonl", GOOD + '{"text": 5, "label": "a"}\n'), None,
                                "types.jsonl:7: field 'text' is int 5; text-classification needs 'text' as non-empty "
                                "text (a string)"),
    "not UTF-8": (lambda d: write(d / "latin.csv", b"text,label\ncaf\xe9,a\n"), None,
                  "latin.csv: not UTF-8 text (byte 14); save it as UTF-8"),
    "empty": (lambda d: write(d / "empty.jsonl", "\n\n"), None, "empty.jsonl: no rows; the data set is empty"),
    "eval label unknown": (lambda d: write(d / "train.jsonl", GOOD),
                           lambda d: write(d / "eval.jsonl", json.dumps({"text": "x", "label": "c"}) + "\n"),
                           "eval.jsonl:1: label 'c' does not occur in the training data (labels: a, b)"),
    "one label": (lambda d: write(d / "one.jsonl", "".join(json.dumps({"text": t, "label": "a"}) + "\n" for t in "xyz")),
                  None, "only one label ('a')"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_is_refused(case, bert, tmp_path):
    make_data, make_eval, message = CASES[case]
    args = ["train", bert, "--data", make_data(tmp_path), "--task", "text-classification", "--out", str(tmp_path / "out")]
    if make_eval:
        args += ["--eval-data", make_eval(tmp_path)]
    result = run_cli(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert result.output.count("\n") == 1 and result.output.startswith("error: ")
    assert not any(p.name.startswith(("out", ".out")) for p in tmp_path.iterdir())


def test_model_without_tokenizer_is_refused(bert, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(bert, model)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (model / name).exists():
            os.remove(model / name)
    data = write(tmp_path / "d.jsonl", GOOD)
    result = run_cli("train", str(model), "--data", data, "--task", "text-classification", "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert f"{model} has no tokenizer" in result.output
    assert not (tmp_path / "out").exists()


def test_wrong_field_for_the_task(bert, tmp_path):
    data = write(tmp_path / "d.jsonl", GOOD)
    result = run_cli("train", bert, "--data", data, "--task", "text2text-generation", "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "d.jsonl:1: the row needs 'source' + 'target' for text2text-generation" in result.output


def test_existing_output_is_kept(bert, tmp_path):
    data = write(tmp_path / "d.jsonl", GOOD)
    (tmp_path / "out").mkdir()
    result = run_cli("train", bert, "--data", data, "--task", "text-classification", "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and "already exists" in result.output


def test_label_names_order_integers_by_value_and_keep_other_names():
    """"²" passes str.isdigit but not int(); "--1" passes lstrip("-").isdigit: both were internal errors."""
    from ia3_export.train.data import Row, label_names

    rows = [Row({"label": name}, f"f:{i}") for i, name in enumerate(["²", "--1", "10", "-2", "b", 3])]
    assert label_names(rows, []) == ["-2", "3", "10", "--1", "b", "²"]


def test_a_csv_field_over_128_kb_is_read(tmp_path):
    """csv's default field_size_limit (131072) called a valid CSV with a 200 KB field "malformed"."""
    from ia3_export.train.data import read_rows

    path = tmp_path / "long.csv"
    long = "word " * 40_000
    path.write_text(f"text,label\n{long},a\nshort,b\n")
    rows = read_rows(str(path), "text-classification")
    assert [r.fields for r in rows] == [{"text": long, "label": "a"}, {"text": "short", "label": "b"}]
