"""The notebook's checker (jaxbirds/lesson.py), fast: what it calls exact, approximate and not written yet."""

import numpy as np
import pytest

from jaxbirds import lesson


def test_cmp_tells_exact_from_approximate_from_wrong():
    ref = np.linspace(1.0, 2.0, 7, dtype=np.float32)
    exact = lesson.cmp("t", ref.copy(), ref)
    close = lesson.cmp("t", ref * np.float32(1 + 1e-7), ref)  # a few ulps off: the tutorial's "approximate"
    wrong = lesson.cmp("t", ref * 1.01, ref)
    assert (exact.exact, exact.approximate, exact.max_diff) == (True, True, 0.0)
    assert (close.exact, close.approximate) == (False, True) and 0 < close.max_diff < 1e-6
    assert (wrong.exact, wrong.approximate) == (False, False)
    assert "exact: False | approximate: True" in close.line()


def test_a_blank_is_not_written_yet_and_never_read_as_a_value():
    assert not lesson.cmp("t", ..., np.ones(3)).written
    assert "not written yet" in lesson.cmp("t", ..., np.ones(3)).line()
    d = lesson.Tensors()
    d.probs = ...
    with pytest.raises(lesson.NotWrittenYet, match="d.probs"):
        _ = d.probs
    with pytest.raises(lesson.NotWrittenYet, match="d.counts"):
        _ = d.counts
