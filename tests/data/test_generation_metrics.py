"""Answer extraction, exact match and perplexity on hand-made cases."""

from __future__ import annotations

import math

import pytest

from lorapro_jax.data.metrics import exact_match, extract_answer, normalize_number, perplexity


@pytest.mark.parametrize("text, answer", [
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),  # GSM8K reference format
    ("#### 1,234", "1234"),
    ("so the answer is\n####  $5.50", "5.5"),
    ("#### 42.0", "42"),
    ("#### -7 degrees", "-7"),
    ("First 17+25=42, then 42-9=33. So 33 apples.", "33"),  # no ####: the last number
    ("5-3", "3"),  # a minus between digits is an operator, not a sign
    ("x = -3", "-3"),
    ("It costs 3.50 dollars, i.e. 350 cents.", "350"),
    ("The total is 1,000.", "1000"),
    ("#### none here, but 12 before", None),  # after #### there is no number ... falls back below
    ("no numbers at all", None),
])
def test_extract_answer(text, answer):
    if text.startswith("#### none"):
        assert extract_answer(text) == "12"  # the last number of the whole text
        return
    assert extract_answer(text) == answer


@pytest.mark.parametrize("raw, norm", [("1,000", "1000"), ("+5", "5"), ("007", "7"), ("2.500", "2.5"), ("-0.0", "0"),
                                       ("$12", "12"), ("3.", "3"), ("abc", None), ("1e3", "1000")])
def test_normalize_number(raw, norm):
    assert normalize_number(raw) == norm


def test_exact_match():
    refs = ["a\n#### 42", "b\n#### 1,000", "c\n#### 7", "free text", "x #### 3"]
    preds = ["so 40+2 = 42.\n#### 42.0", "#### 1000", "I think 8", "free text  ", "no answer"]
    assert exact_match(preds, refs) == [True, True, False, True, False]
    with pytest.raises(ValueError):
        exact_match(["a"], [])


def test_perplexity():
    assert perplexity(2 * math.log(3.0), 2) == pytest.approx(3.0)
    assert perplexity(0.0, 5) == 1.0
    assert perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError):
        perplexity(1.0, 0)
