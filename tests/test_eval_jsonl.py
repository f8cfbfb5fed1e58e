"""JSONL task files: loading, and errors that name the file, the line and the problem."""

import json

import pytest

from dyllm_fx.eval.jsonl_tasks import JsonlTaskError, load_jsonl, load_task, suite_examples
from dyllm_fx.eval.synthetic_tasks import TASKS


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_loads_examples_with_default_and_given_task(tmp_path):
    path = _write(
        tmp_path / "gsm8k_local.jsonl",
        [
            json.dumps({"prompt": "What is 2+2?", "answer": "#### 4"}),
            "",
            json.dumps({"prompt": "3*3?", "answer": 9, "task": "mult"}),
        ],
    )
    examples = load_jsonl(path)
    assert [(e.task, e.prompt, e.answer) for e in examples] == [
        ("gsm8k_local", "What is 2+2?", "#### 4"),
        ("mult", "3*3?", "9"),
    ]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"prompt": "x", "answer": "y"', r"bad\.jsonl:2: invalid JSON"),
        ('{"prompt": "x"}', r"bad\.jsonl:2: missing field 'answer'"),
        ('{"answer": "y"}', r"bad\.jsonl:2: missing field 'prompt'"),
        ('{"question": "x"}', r"bad\.jsonl:2: missing field 'prompt', 'answer'"),
        ('["x", "y"]', r"bad\.jsonl:2: expected a JSON object"),
        ('{"prompt": "", "answer": "y"}', r"bad\.jsonl:2: field 'prompt' must be a non-empty string"),
        ('{"prompt": "x", "answer": null}', r"bad\.jsonl:2: field 'answer' must be a string or a number"),
    ],
)
def test_malformed_line_names_file_line_and_problem(tmp_path, bad_line, message):
    path = _write(tmp_path / "bad.jsonl", [json.dumps({"prompt": "ok", "answer": "ok"}), bad_line])
    with pytest.raises(JsonlTaskError, match=message):
        load_jsonl(path)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(JsonlTaskError, match="no examples"):
        load_jsonl(_write(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(FileNotFoundError, match="'suite' for the synthetic suite"):
        load_task(tmp_path / "missing.jsonl")


def test_suite_is_interleaved_across_tasks_and_limited():
    first = suite_examples(limit=len(TASKS))
    assert sorted(e.task for e in first) == sorted(TASKS)
    assert len(load_task("suite", limit=4)) == 4
    assert len(suite_examples(per_task=2)) == 2 * len(TASKS)
    with pytest.raises(ValueError, match="limit must be at least 1"):
        load_task("suite", limit=0)
