"""Helpers of scripts/analyze_attention_sparsity.py and scripts/accuracy_noise.py (CPU)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from accuracy_noise import min_significant_flips, noise_table, wilson  # noqa: E402
from analyze_attention_sparsity import count_to_tau, parse_rule  # noqa: E402


def test_count_to_tau_is_minimal_and_keeps_forced():
    torch.manual_seed(0)
    m = torch.rand(4, 20).double()
    m /= m.sum(-1, keepdim=True)
    forced = torch.zeros(20, dtype=torch.bool)
    forced[0] = forced[-2:] = True
    valid = torch.ones(20, dtype=torch.bool)
    cnt, mask = count_to_tau(m, m, forced, valid, 0.8)
    assert bool(mask[:, forced].all())
    assert bool(((m * mask).sum(-1) >= 0.8 - 1e-12).all())
    for r in range(4):  # dropping the smallest selected candidate falls below tau
        cand = mask[r] & ~forced
        smallest = m[r][cand].min()
        assert float((m[r] * mask[r]).sum() - smallest) < 0.8
    assert cnt.tolist() == mask.sum(-1).tolist()


def test_parse_rule():
    r = parse_rule("est:0.95:min=32:cap=2.0/8+2.1/16:ltau=2/0.8")
    assert r["kind"] == "est" and r["tau"] == 0.95 and r["min"] == 32
    assert r["cap"] == {(2, 0): 8, (2, 1): 16} and r["ltau"] == {2: 0.8}
    assert parse_rule("topk:32")["k"] == 32


def test_noise():
    lo, hi = wilson(9, 10)
    assert 0.59 < lo < 0.60 and 0.98 < hi < 0.99
    assert min_significant_flips() == 6
    t = noise_table([10, 100])
    assert t["n_to_bound_loss_below_f_with_zero_flips"] == 150
    assert t["by_n"][0]["significant_gap"] == 0.6
