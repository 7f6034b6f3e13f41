"""Outlier rules and the seed study's breakdown on hand-built token tables."""

from __future__ import annotations

import pytest
import torch

from sae_transfer.evals.outliers import OutlierRule, breakdown, choose_threshold, flag_tokens, flagged_by
from sae_transfer.evals.positions import context_sizes, position_buckets


def test_breakdown_on_hand_built_table():
    # One sequence of 20 tokens; outliers at 0 (BOS), 3, 5 (a newline, but within the first 10
    # positions, which takes priority), 12 and 15 (newlines) and 18 (other).
    pos = torch.arange(20)
    is_bos = pos == 0
    is_newline = torch.zeros(20, dtype=torch.bool)
    is_newline[[5, 12, 15]] = True
    out = torch.zeros(20, dtype=torch.bool)
    out[[0, 3, 5, 12, 15, 18]] = True
    b = breakdown(out, is_bos, pos, is_newline)
    assert (b.n_tokens, b.n_outliers) == (20, 6)
    assert b.frac_outliers == pytest.approx(6 / 20)
    assert b.frac_bos == pytest.approx(1 / 6)
    assert b.frac_first10 == pytest.approx(2 / 6)  # pos 3, and the newline at pos 5 (first-10 wins)
    assert b.frac_newline == pytest.approx(2 / 6)
    assert b.frac_other == pytest.approx(1 / 6)
    assert b.frac_bos + b.frac_first10 + b.frac_newline + b.frac_other == pytest.approx(1.0)


def test_breakdown_without_outliers_is_nan_shares():
    z = torch.zeros(4, dtype=torch.bool)
    b = breakdown(z, z, torch.arange(4), z)
    assert b.n_outliers == 0 and b.frac_outliers == 0.0 and b.frac_bos != b.frac_bos


def test_threshold_rules():
    norms = torch.tensor([9.0, 10.0, 10.0, 11.0, 10.0, 300.0])
    assert choose_threshold(norms, OutlierRule(threshold=50.0)) == ("config", 50.0)
    rule, t = choose_threshold(norms, OutlierRule(mad_k=10))
    # median 10, MAD 0 -> the robust threshold sits just at the median: flags only values above it
    assert rule == "median+10mad" and t == pytest.approx(10.0)
    norms = torch.tensor([8.0, 9.0, 10.0, 11.0, 12.0, 300.0])
    _, t = choose_threshold(norms, OutlierRule(mad_k=10))
    # torch's median is the lower middle value: median 10, |x - 10| = 2,1,0,1,2,290 -> MAD 1
    assert t == pytest.approx(10.0 + 10 * 1.4826 * 1.0)
    assert int((norms > t).sum()) == 1


def test_position_buckets_and_context_sizes():
    assert position_buckets(10) == [(0, 0), (1, 1), (2, 3), (4, 7), (8, 9)]
    assert position_buckets(8) == [(0, 0), (1, 1), (2, 3), (4, 7)]
    assert context_sizes(64, 200) == [64, 128]
    assert context_sizes(64, None, (1, 2, 4)) == [64, 128, 256]


def test_rule_choice_decides_exclusion_and_records_who_flagged():
    # median 10 -> k x median (k=3) cut-off 30; absolute cut-off 100
    scaled = torch.tensor([10.0, 10.0, 9.0, 11.0, 50.0, 150.0])
    want = {"absolute": [0, 0, 0, 0, 0, 1], "k_median": [0, 0, 0, 0, 1, 1], "either": [0, 0, 0, 0, 1, 1]}
    for rule, expected in want.items():
        f = flag_tokens(scaled, 100.0, 3.0 * 10.0, rule)
        assert f.outlier_N.int().tolist() == expected, rule
    f = flag_tokens(scaled, 100.0, 30.0, "absolute")
    assert [flagged_by(a, k) for a, k in zip(f.absolute_N.tolist(), f.k_median_N.tolist())][-2:] == ["k_median", "both"]


def test_outlier_rule_rejects_unknown_rule_and_negative_threshold():
    with pytest.raises(ValueError, match="rule"):
        OutlierRule(rule="median")
    with pytest.raises(ValueError, match="threshold"):
        OutlierRule(threshold=-1.0)
