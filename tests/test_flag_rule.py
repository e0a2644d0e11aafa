"""Never silence a melanoma: the scope rule changes an alert's words, never whether it goes out."""

from __future__ import annotations

import pytest

from service.flags import MELANOMA_SUSPECTED, UNUSUAL_PICTURE, flag_of


@pytest.mark.parametrize("threshold", [0.0, 0.02, 0.05, 0.5, 0.99, 1.0])
@pytest.mark.parametrize("above", [0.0, 1e-9, 0.01, 0.5])
def test_the_scope_rule_never_clears_a_flag_at_or_above_the_threshold(threshold: float,
                                                                       above: float) -> None:
    p = min(1.0, threshold + above)
    for out_of_scope in (False, True):
        flag = flag_of(p, threshold, out_of_scope=out_of_scope)
        assert flag.flagged, (p, threshold, out_of_scope)
        assert flag.unusual == out_of_scope


def test_below_the_threshold_nothing_is_flagged_in_or_out_of_scope() -> None:
    for out_of_scope in (False, True):
        flag = flag_of(0.0499, 0.05, out_of_scope=out_of_scope)
        assert not flag.flagged and not flag.unusual and flag.label is None


def test_an_unusual_picture_is_never_called_a_suspected_melanoma() -> None:
    assert flag_of(0.9, 0.05, out_of_scope=True).label == UNUSUAL_PICTURE
    assert flag_of(0.9, 0.05, out_of_scope=False).label == MELANOMA_SUSPECTED
    assert "melanoma suspected" not in UNUSUAL_PICTURE.lower()
