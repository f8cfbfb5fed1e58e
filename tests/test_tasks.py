"""The synthetic suite: answers follow each task's definition, and train/test never overlap."""

import random

import pytest

from dyllm_fx.char_tokenizer import build_char_tokenizer
from dyllm_fx.eval.synthetic_tasks import (
    ALPHABET,
    DIFFICULTY,
    EASY_TASKS,
    TASKS,
    held_out_set,
    is_test_prompt,
    sample,
)


def _body(prompt: str) -> str:
    return prompt.split(":", 1)[1].rstrip("=")


def test_answers_follow_definitions():
    rng = random.Random(0)
    for _ in range(20):
        ex = sample("shift", rng)
        assert ex.answer == "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in _body(ex.prompt))
        ex = sample("copy", rng)
        assert ex.answer == _body(ex.prompt)
        ex = sample("reverse", rng)
        assert ex.answer == _body(ex.prompt)[::-1]
        ex = sample("sort", rng)
        assert ex.answer == "".join(sorted(_body(ex.prompt)))
        ex = sample("add", rng)
        a, b = _body(ex.prompt).split("+")
        assert int(ex.answer) == int(a) + int(b)
        ex = sample("running_sum", rng)
        digits = [int(c) for c in _body(ex.prompt)]
        assert [int(c) for c in ex.answer] == [sum(digits[: i + 1]) % 10 for i in range(len(digits))]
        ex = sample("lookup", rng)
        table, query = _body(ex.prompt).split("?")
        kv = dict((p[0], p[1]) for p in table.split(","))
        assert ex.answer == "".join(kv[k] for k in query)


def test_split_is_disjoint_and_reproducible():
    held_out = held_out_set(5)
    assert all(is_test_prompt(e.prompt) for e in held_out)
    assert held_out == held_out_set(5)  # fixed seed: the same prompts every run
    rng = random.Random(1)
    assert not any(is_test_prompt(sample(t, rng, "train").prompt) for t in TASKS for _ in range(30))


def test_every_character_is_in_the_tokenizer():
    tok = build_char_tokenizer(ALPHABET)
    rng = random.Random(2)
    for task in TASKS:
        ex = sample(task, rng)
        ids = tok(ex.prompt + ex.answer, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == ex.prompt + ex.answer


def test_tiers_cover_the_suite():
    assert set(DIFFICULTY) == set(TASKS) and set(EASY_TASKS) <= set(TASKS)


def test_bad_arguments():
    with pytest.raises(KeyError, match="unknown task"):
        sample("nope", random.Random(0))
    with pytest.raises(ValueError, match="split"):
        sample("sort", random.Random(0), "validation")
