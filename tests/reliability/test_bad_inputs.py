"""Every bad input of reliability_cases.py raises its documented error type with a message that says what is wrong."""

from __future__ import annotations

import re

import pytest
from reliability_cases import ALL_CASES, message_of


@pytest.mark.parametrize("case", ALL_CASES, ids=[c.name for c in ALL_CASES])
def test_bad_input_message(case, tmp_path):
    etype, msg = message_of(case, tmp_path)
    assert etype is not None, f"{case.name}: no error raised"
    assert issubclass(etype, case.error), f"{case.name}: {etype.__name__}: {msg}"
    assert re.search(case.match, msg), f"{case.name}: message {msg!r} does not match {case.match!r}"
