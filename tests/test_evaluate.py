"""The paired comparison of two policies' held-out samples (``evaluate.paired_outcomes``),
worked by hand."""

from __future__ import annotations

import pytest

from rlhf_jax.evaluate import paired_outcomes, versus_summary


def _rows(scores, uids="aabb"):
    return [{"uid": u, "sample": i % 2, "score": s} for i, (u, s) in enumerate(zip(uids, scores))]


def test_pairs_by_prompt_and_sample_whatever_the_order():
    ours, theirs = _rows([1.0, 0.0, 0.5, -1.0]), _rows([0.0, 0.0, 1.0, 1.0])
    out = paired_outcomes(ours[::-1], theirs, top_score=1.0)   # order does not matter
    assert (out["wins"], out["ties"], out["losses"]) == (1, 1, 2)
    assert out["win_rate"] == pytest.approx((1 + 0.5) / 4)
    # a perfect policy wins against each score below the top and ties with the two at it
    assert out["ceiling"] == pytest.approx((1 + 1 + 0.5 + 0.5) / 4)
    s = versus_summary(out, "x_vs_y")
    assert s["wins_over_decisive/x_vs_y"] == pytest.approx(1 / 3)


def test_a_record_without_a_partner_is_named():
    ours, theirs = _rows([1.0, 0.0, 0.5, -1.0]), _rows([0.0, 0.0, 1.0], uids="aab")
    with pytest.raises(ValueError, match=r"1 of 4 records .*\('b', 1\)"):
        paired_outcomes(ours, theirs, top_score=1.0)
