"""The lm-evaluation-harness adapter on the embedded model: a tiny local generation task run
through lm_eval.simple_evaluate, and generate_until called directly with Instance objects."""

import json
import subprocess
import sys

import pytest

lm_eval = pytest.importorskip("lm_eval", reason='lm-eval is an optional extra: pip install "dyllm-fx[eval]"')

from lm_eval.api.instance import Instance  # noqa: E402

from dyllm_fx.eval.lm_eval_adapter import DyLLMEvalLM, cut_at_stop  # noqa: E402
from dyllm_fx.eval.synthetic_tasks import held_out_set  # noqa: E402

# Slow (`-m "not slow"` leaves it out): imports and runs lm-evaluation-harness.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lm():
    return DyLLMEvalLM(
        pretrained="default", policy="dual_cache", gen_length=32, block_length=16, batch_size=2
    )


def _request(context, **gen_kwargs):
    return Instance("generate_until", doc={}, arguments=(context, gen_kwargs), idx=0)


def test_importing_dyllm_fx_does_not_import_lm_eval_or_matplotlib():
    code = (
        "import sys, dyllm_fx, dyllm_fx.cli.main; "
        "print(sorted(m for m in ('lm_eval', 'matplotlib') if m in sys.modules))"
    )
    assert (
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()
        == "[]"
    )


def test_generate_until_respects_stop_strings_and_max_gen_toks(lm):
    ex = held_out_set(1, tasks=("shift",))[0]
    full, cut = lm.generate_until(
        [
            _request(ex.prompt, until=["\n\n"], max_gen_toks=32),
            _request(ex.prompt, until=[ex.answer[5:8]], max_gen_toks=32),
        ]
    )
    assert full == ex.answer  # the embedded model solves shift
    assert cut == ex.answer[: full.index(ex.answer[5:8])]
    # max_gen_toks sets the window (rounded up to whole blocks); steps follow the window
    lm.generate_until([_request(ex.prompt, until=[], max_gen_toks=20)])
    assert lm._schedule(20) == (32, 16, None)
    info = lm.get_model_info()
    assert info["dyllm_policy"] == "dual_cache" and info["dyllm_nfe_per_generation"] > 0
    assert 0 < info["dyllm_active_fraction"] < 1


def test_steps_scale_with_the_window():
    lm = DyLLMEvalLM(model=_Dummy(), tokenizer=object(), gen_length=64, block_length=32, steps=32)
    assert lm._schedule(64) == (64, 32, 32)
    assert lm._schedule(256) == (256, 32, 128)


def test_loglikelihood_says_why_it_is_missing(lm):
    with pytest.raises(NotImplementedError, match="ELBO"):
        lm.loglikelihood([Instance("loglikelihood", doc={}, arguments=("a", "b"), idx=0)])
    with pytest.raises(NotImplementedError, match="Monte-Carlo"):
        lm.loglikelihood_rolling([Instance("loglikelihood_rolling", doc={}, arguments=("a",), idx=0)])


def test_unknown_model_args_are_named():
    with pytest.raises(ValueError, match=r"unknown model_args \['tau'\].*policy_tau"):
        DyLLMEvalLM(model=_Dummy(), tokenizer=object(), tau=0.9)


def test_cut_at_stop():
    assert cut_at_stop("abc\n\nQ: next", ["Q:", "\n\n"]) == "abc"
    assert cut_at_stop("abc", []) == "abc"


@pytest.mark.slow
def test_simple_evaluate_on_a_local_task(tmp_path):
    # include_defaults=False: indexing lm-eval's ~14k built-in task YAMLs alone takes seconds
    from lm_eval.tasks import TaskManager

    data = tmp_path / "shift.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": e.prompt, "answer": e.answer}) + "\n"
            for e in held_out_set(2, tasks=("shift",))
        )
    )
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "dyllm_tiny_shift.yaml").write_text(f"""\
task: dyllm_tiny_shift
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {tmp_path / "hf_cache"}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 32
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    import dyllm_fx.eval.lm_eval_adapter  # noqa: F401  (registers "dyllm")

    res = lm_eval.simple_evaluate(
        model="dyllm",
        model_args="pretrained=default,policy=dual_cache,block_length=16",
        tasks=["dyllm_tiny_shift"],
        task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False),
        batch_size=2,
    )
    assert res["results"]["dyllm_tiny_shift"]["exact_match,none"] == 1.0
    assert res["config"]["dyllm_policy"] == "dual_cache"


class _Dummy:
    """Just enough of a model for constructor-only tests (vanilla policy: no transform)."""

    def parameters(self):
        import torch

        yield torch.zeros(1)
