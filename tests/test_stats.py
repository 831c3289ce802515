"""megamoe.stats: Student-t quantiles against table values, and the verdict words the studies print
(issue 31's must-shows: a 3-seed "2 SE" gap is not resolved, an equivalence inside the margin on 5
seeds is a tie, Holm turns a borderline win into "not resolved" when the family grows)."""

from __future__ import annotations

import math

import pytest

from megamoe.stats import WORDS, holm, paired_interval, t_ppf, t_sf, tost, verdict, verdicts


@pytest.mark.parametrize("q,df,want", [
    (0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 4, 2.776), (0.975, 9, 2.262), (0.975, 30, 2.042),
    (0.95, 4, 2.132), (0.995, 2, 9.925), (0.9, 10, 1.372), (0.975, 1000, 1.962)])
def test_t_quantiles_match_tables(q, df, want):
    assert t_ppf(q, df) == pytest.approx(want, abs=5e-4)
    assert t_ppf(1 - q, df) == pytest.approx(-want, abs=5e-4)
    assert t_sf(t_ppf(q, df), df) == pytest.approx(1 - q, rel=1e-9)


def test_t_sf_closed_forms():
    # df 1 is Cauchy: P(T > t) = 1/2 - atan(t)/pi; df 2: 1/2 - t / (2 sqrt(2 + t^2))
    for t in (0.1, 1.0, 3.0, 40.0):
        assert t_sf(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, rel=1e-10)
        assert t_sf(t, 2) == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)), rel=1e-10)


def test_paired_interval_by_hand():
    iv = paired_interval([0.10, 0.02, 0.06])  # mean 0.06, sd 0.04, se 0.04/sqrt(3)
    half = 4.302653 * 0.04 / math.sqrt(3)
    assert (iv.mean, iv.n) == (pytest.approx(0.06), 3)
    assert iv.lo == pytest.approx(0.06 - half, rel=1e-6) and iv.hi == pytest.approx(0.06 + half, rel=1e-6)
    assert iv.p == pytest.approx(2 * t_sf(0.06 / (0.04 / math.sqrt(3)), 2))
    assert math.isnan(paired_interval([0.3]).lo)


def test_three_seed_two_se_gap_is_not_resolved():
    """t = 2.6 on 2 df: the old rule called it 'worse' (gap > 2 SE); p = 0.12, not significant,
    and far from equivalent at ±0.01."""
    d = [0.10, 0.02, 0.06]
    se = 0.04 / math.sqrt(3)
    assert abs(sum(d) / 3) > 2 * se  # the old 2-SE rule's 'worse'
    v = verdict(d, margin=0.01)
    assert v.word == "not resolved" and 0.05 < v.p_adj < 0.2


def test_equivalence_inside_the_margin_on_five_seeds_is_a_tie():
    d = [0.002, -0.003, 0.001, 0.000, -0.001]
    v = verdict(d, margin=0.01)
    assert v.word == "tie" and v.p_tost_adj < 0.05 and -0.01 < v.lo < v.hi < 0.01
    # the same spread, centred just outside the margin, is not a tie
    assert verdict([x + 0.012 for x in d], margin=0.01).word != "tie"
    # a tight gap of 0.005 on 5 seeds is a real difference and inside the margin: significance wins
    assert verdict([0.005, 0.0051, 0.0049, 0.0050, 0.0052], margin=0.01).word == "worse"


def test_clear_wins_and_losses():
    d = [-0.20, -0.18, -0.22, -0.19, -0.21]
    assert verdict(d, margin=0.01).word == "better"
    assert verdict([-x for x in d], margin=0.01).word == "worse"
    assert verdict([0.0] * 5, margin=0.01).word == "tie"  # zero spread, zero mean
    assert verdict([0.05] * 3, margin=0.01).word == "worse"  # zero spread, nonzero mean
    assert verdict([0.05], margin=0.01).word == "not resolved"  # one seed: no interval


def test_holm_adjusts_as_by_hand():
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert holm([0.2, float("nan")])[0] == pytest.approx(0.4) and math.isnan(holm([0.2, float("nan")])[1])
    assert holm([]) == []


def test_holm_changes_a_borderline_verdict_as_the_family_grows():
    """p ~ 0.02 alone is 'worse'; among 5 comparisons whose others are null it is 'not resolved'."""
    border = [0.030, 0.002, 0.021, 0.040, 0.015]  # p = 0.029
    alone = verdicts({"x": border}, margin=0.001)["x"]
    assert alone.word == "worse" and 0.02 < alone.p_adj < 0.05
    nulls = {f"n{i}": [0.01, -0.02, 0.015, -0.005, 0.0 + i * 1e-3] for i in range(4)}
    family = verdicts({"x": border, **nulls}, margin=0.001)
    assert family["x"].word == "not resolved" and family["x"].p_adj >= 0.05
    assert verdict(border, margin=0.001, m=5).word == "not resolved"  # Bonferroni form agrees here
    assert all(v.word in WORDS for v in family.values())


def test_tost_matches_the_one_minus_two_alpha_interval():
    d = [0.004, -0.002, 0.006, 0.001, 0.003]
    iv90 = paired_interval(d, 0.90)
    for margin in (0.004, 0.006, 0.008, 0.02):
        inside = -margin < iv90.lo and iv90.hi < margin
        assert (tost(d, margin) < 0.05) == inside


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="margin"):
        tost([0.1, 0.2], 0)
    with pytest.raises(ValueError, match="m "):
        verdict([0.1, 0.2], margin=0.01, m=0)
    with pytest.raises(ValueError, match="no differences"):
        paired_interval([])
