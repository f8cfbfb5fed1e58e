"""Wilson intervals and the exact McNemar test, against values worked out by hand."""

import math

import pytest

from dyllm_fx.eval.significance import (
    Paired,
    format_accuracy,
    format_p,
    mcnemar_exact,
    paired_counts,
    wilson_interval,
)


def test_wilson_eight_of_ten():
    # p = 0.8, n = 10, z^2 = 3.841459: denominator 1 + z^2/n = 1.3841459,
    # centre (0.8 + z^2/20) / 1.3841459 = 0.9920729 / 1.3841459 = 0.716741,
    # half width z * sqrt(0.016 + z^2/400) / 1.3841459 = 1.959964 * 0.1600113 / 1.3841459 = 0.226576.
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.716741 - 0.226576, abs=1e-5)  # 0.490165
    assert high == pytest.approx(0.716741 + 0.226576, abs=1e-5)  # 0.943317


def test_wilson_half_of_four_hundred():
    # p = 1/2, n = 400: centre exactly 1/2; half width z * sqrt(1/1600 + z^2/640000) / (1 + z^2/400)
    # = 1.959964 * sqrt(0.000625 + 0.0000060023) / 1.0096036 = 1.959964 * 0.0251198 / 1.0096036 = 0.048766.
    low, high = wilson_interval(200, 400)
    assert (low + high) / 2 == pytest.approx(0.5, abs=1e-12)
    assert high - 0.5 == pytest.approx(0.048766, abs=1e-5)


def test_wilson_at_the_ends():
    # 0 of 10: low 0, high z^2 / (n + z^2) = 3.841459 / 13.841459 = 0.277533; 10 of 10 mirrors it.
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.277533, abs=1e-5))
    low, high = wilson_interval(10, 10)
    assert high == 1.0 and low == pytest.approx(1 - 0.277533, abs=1e-5)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(5, 4)


def test_mcnemar_by_hand():
    assert mcnemar_exact(0, 0) == 1.0  # no discordant prompt: no evidence either way
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)  # 2 * P(X = 0), X ~ Bin(5, 1/2)
    assert mcnemar_exact(4, 1) == pytest.approx(2 * (1 + 5) / 32)  # 2 * P(X <= 1) = 0.375
    assert mcnemar_exact(3, 3) == 1.0  # 2 * P(X <= 3) = 2 * 42/64 > 1, capped
    assert mcnemar_exact(1, 0) == 1.0
    # 10 against 2: 2 * (1 + 12 + 66) / 4096 = 158 / 4096 = 0.0385742
    assert mcnemar_exact(10, 2) == pytest.approx(158 / 4096)
    assert mcnemar_exact(2, 10) == mcnemar_exact(10, 2)
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)


def test_paired_counts_and_formatting():
    method = [True, True, False, False, True]
    vanilla = [True, False, True, False, False]
    assert paired_counts(method, vanilla) == (2, 1)
    paired = Paired.of(method, vanilla)
    assert (paired.won, paired.lost, paired.p_value) == (2, 1, 1.0)
    with pytest.raises(ValueError, match="same prompts"):
        paired_counts([True], [True, False])
    assert format_accuracy(8, 10) == "80.0% [49.0, 94.3]"
    assert format_p(0.0385742) == "0.0386" and format_p(1e-5) == "<0.001" and format_p(1.0) == "1"
    assert math.isclose(wilson_interval(1, 2)[0] + wilson_interval(1, 2)[1], 1.0)
