"""`dyllm eval` on the embedded model (a few prompts, short windows)."""

import json

import pytest

from dyllm_fx.cli.main import main

FAST = ["--gen-length", "32", "--block-length", "16", "--quiet"]


@pytest.mark.slow
def test_eval_suite_reports_every_figure(tmp_path, capsys):
    out = tmp_path / "eval.json"
    rc = main(["eval", "--policy", "dual_cache", "--limit", "4", "--json", str(out), *FAST])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| all |" in printed and "policy dual_cache: accuracy" in printed and "vs vanilla" in printed
    report = json.loads(out.read_text())
    assert report["n"] == 4 and len(report["examples"]) == 4
    assert 0.0 <= report["accuracy"] <= 1.0 and report["tokens_per_s"] > 0 and report["nfe"] == 32
    assert 0.0 < report["active_fraction"] < 1.0 and 0.0 <= report["agreement"] <= 1.0
    assert report["policy"] == "dual_cache" and report["decoding"]["gen_length"] == 32
    low, high = report["accuracy_interval"]
    assert low <= report["accuracy"] <= high and report["correct"] == round(4 * report["accuracy"])
    assert all(s["interval"][0] <= s["accuracy"] <= s["interval"][1] for s in report["per_task"].values())
    paired = report["paired"]
    assert paired["won"] + paired["lost"] <= 4 and 0 < paired["mcnemar_p"] <= 1
    assert f"{paired['won']} won, {paired['lost']} lost, exact McNemar p" in printed


@pytest.mark.slow
def test_eval_jsonl_with_extractor_and_policy_args(tmp_path, capsys):
    from dyllm_fx.eval.synthetic_tasks import held_out_set

    task = tmp_path / "mine.jsonl"
    task.write_text(
        "".join(
            json.dumps({"prompt": e.prompt, "answer": e.answer}) + "\n"
            for e in held_out_set(2, tasks=("shift",))
        )
    )
    rc = main(
        [
            "eval",
            "--task",
            str(task),
            "--policy",
            "fixed",
            "--policy-arg",
            "rows=0,1,2,3",
            "--extractor",
            "identity",
            "--reference",
            "none",
            "--json",
            str(tmp_path / "r.json"),
            *FAST,
        ]
    )
    assert rc == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["n"] == 2 and report["per_task"].keys() == {"mine"} and report["agreement"] is None
    assert report["policy_args"] == {"rows": [0, 1, 2, 3]}
    assert "token agreement not measured" in capsys.readouterr().out


def test_eval_errors_are_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "c"}\n')
    assert main(["eval", "--task", str(bad), *FAST]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2: missing field 'answer'" in err and "Traceback" not in err
    assert main(["eval", "--policy", "nope", "--limit", "1", *FAST]) == 2
    assert "unknown policy 'nope'" in capsys.readouterr().err
    assert main(["eval", "--policy-arg", "tau=0.9", "--limit", "1", *FAST]) == 2
    assert "takes no policy arguments" in capsys.readouterr().err
