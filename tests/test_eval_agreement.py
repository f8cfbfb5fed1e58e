"""Token agreement with vanilla decoding, and evaluate_policy on the embedded model."""

import pytest
import torch

import dyllm_fx
from dyllm_fx.eval.agreement import AgreementCounter, token_agreement
from dyllm_fx.eval.evaluate import evaluate_policy
from dyllm_fx.eval.jsonl_tasks import suite_examples
from dyllm_fx.policy_setup import apply_policy, parse_policy_args, parse_value

FAST = dict(gen_length=32, block_length=16, batch_size=4)


def test_agreement_counts_identical_positions():
    a = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    b = torch.tensor([[1, 2, 0, 4], [5, 0, 0, 8]])
    assert token_agreement(a, a) == 1.0
    assert token_agreement(a, b) == pytest.approx(5 / 8)
    counter = AgreementCounter()
    counter.update(a, b)
    counter.update([[9, 9]], [[9, 9]])
    assert (counter.same, counter.total) == (7, 10)
    assert AgreementCounter().value == 1.0


def test_agreement_rejects_misaligned_runs():
    with pytest.raises(ValueError, match="same prompts, batch size and gen_length"):
        token_agreement(torch.zeros(2, 4), torch.zeros(2, 5))


def test_policy_args_are_parsed():
    assert parse_policy_args(["tau=0.99", "rows=0,1,2", "refresh-every=8", "flag=true", "name=x"]) == {
        "tau": 0.99,
        "rows": [0, 1, 2],
        "refresh_every": 8,
        "flag": True,
        "name": "x",
    }
    assert parse_value("none") is None
    with pytest.raises(ValueError, match="not key=value"):
        parse_policy_args(["tau"])


def test_vanilla_takes_no_policy_arguments():
    model, _ = dyllm_fx.load("default")
    assert apply_policy(model, "vanilla") is model
    with pytest.raises(ValueError, match="takes no policy arguments"):
        apply_policy(model, "vanilla", {"tau": 0.9})


@pytest.fixture(scope="module")
def embedded():
    return dyllm_fx.load("default")


@pytest.mark.slow
def test_dense_agrees_with_vanilla_and_dual_cache_is_sparse(embedded):
    model, tok = embedded
    examples = suite_examples(limit=3)
    dense, ref = evaluate_policy(model, tok, examples, policy="dense", progress=False, **FAST)
    assert ref is not None and dense.agreement == 1.0  # dense recomputes every row: same tokens
    assert dense.active_fraction == 1.0 and ref.active_fraction == 1.0
    assert dense.outputs == ref.outputs
    dual, _ = evaluate_policy(
        model, tok, examples, policy="dual_cache", reference="dense", progress=False, **FAST
    )
    assert dual.active_fraction < 0.9
    assert 0.0 <= dual.agreement <= 1.0
    assert dual.nfe_per_generation == 32 and dual.generations == 1
    summary = dual.summary()
    assert summary["n"] == 3 and summary["tokens_per_s"] > 0


def test_vanilla_is_its_own_reference(embedded):
    model, tok = embedded
    result, ref = evaluate_policy(
        model, tok, suite_examples(limit=2), policy="vanilla", progress=False, **FAST
    )
    assert ref is None and result.agreement == 1.0 and result.active_fraction == 1.0
    result, ref = evaluate_policy(
        model, tok, suite_examples(limit=2), policy="vanilla", reference=None, progress=False, **FAST
    )
    assert result.agreement is None
