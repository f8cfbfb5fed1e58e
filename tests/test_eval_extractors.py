"""Answer extractors and exact match (dyllm_fx.eval.extractors)."""

import pytest

from dyllm_fx.eval.extractors import EXTRACTORS, exact_match, get_extractor, normalize_number


def test_identity_and_strip():
    assert get_extractor("identity")(" abc\n") == " abc\n"
    assert get_extractor("strip")(" abc\n") == "abc"


@pytest.mark.parametrize(
    "text, number", [("1,234", "1234"), ("72.0", "72"), ("$5", "5"), ("-3.50", "-3.5"), ("7.", "7")]
)
def test_normalize_number(text, number):
    assert normalize_number(text) == number


def test_gsm8k_reads_the_last_hash_answer_and_falls_back_to_the_last_number():
    gsm8k = get_extractor("gsm8k")
    assert gsm8k("She has 3 apples.\n#### 1,234") == "1234"
    assert gsm8k("#### 4\nwait, redo\n#### 5") == "5"
    assert gsm8k("So the answer is 42 apples.") == "42"
    assert gsm8k("no number here") is None
    assert get_extractor("gsm8k_strict")("So the answer is 42.") is None


def test_last_number():
    last = get_extractor("last_number")
    assert last("from 3 to -12.5 then 7,000 left") == "7000"
    assert last("none") is None


def test_exact_match_against_a_gsm8k_solution_and_a_bare_answer():
    solution = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"
    assert exact_match("... so she sold 72 clips.", solution, "gsm8k")
    assert exact_match("#### 72.00", "72", "gsm8k")
    assert exact_match("1,234", "1234", "last_number")
    assert not exact_match("71", solution, "gsm8k")
    assert not exact_match("no answer", "72", "gsm8k")  # nothing extracted scores as wrong


def test_strip_exact_match_is_the_suites_rule():
    assert exact_match("  abc ", "abc")
    assert not exact_match("abcd", "abc")


def test_unknown_extractor_names_the_choices():
    with pytest.raises(ValueError, match="unknown extractor 'regex'.*gsm8k"):
        get_extractor("regex")
    assert get_extractor(str.upper) is str.upper  # callables pass through
    assert set(EXTRACTORS) >= {"identity", "strip", "gsm8k", "last_number"}
