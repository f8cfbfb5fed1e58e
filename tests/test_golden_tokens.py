"""Every policy and composition decodes the tokens captured before the one-spine refactor
(``tests/golden_tokens.py``), on both embedded models, with and without threshold decoding."""

from __future__ import annotations

import json

import pytest
import torch

import dyllm_fx
from golden_tokens import GOLDEN, MODELS, POLICIES, SETTINGS, case_key, run_case

GOLDEN_TOKENS = json.loads(GOLDEN.read_text())


def test_golden_file_covers_every_case():
    expected = {case_key(m, p, s) for m in MODELS for p in POLICIES for s in SETTINGS}
    assert set(GOLDEN_TOKENS) == expected


@pytest.fixture(scope="module", params=MODELS)
def loaded(request):
    torch.set_num_threads(1)
    model, tokenizer = dyllm_fx.load(request.param)
    return request.param, model, tokenizer


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("policy", POLICIES)
def test_tokens_unchanged(loaded, policy, setting):
    name, model, tokenizer = loaded
    got = run_case(model, tokenizer, name, policy, setting)
    assert got == GOLDEN_TOKENS[case_key(name, policy, setting)]
