"""Learning-rate selection, seed statistics and the cache key, without training."""

from __future__ import annotations

import math

import pytest

from rwkv_zoo.train.ablate import cell_key, describe, select_lr, t_quantile_975
from rwkv_zoo.train.ablate.stats import fmt_ci, fmt_stat


def _rec(lr, seed, **final):
    return {"lr": lr, "seed": seed, "final": final}


def test_the_learning_rate_with_the_best_mean_over_seeds_is_picked():
    # 3e-3 has the best single run (0.99) but 1e-3 has the best mean: the mean decides.
    recs = [_rec(1e-4, 0, acc=0.2, loss=3.0), _rec(1e-4, 1, acc=0.3, loss=3.0),
            _rec(1e-3, 0, acc=0.9, loss=1.0), _rec(1e-3, 1, acc=0.8, loss=1.0),
            _rec(3e-3, 0, acc=0.99, loss=0.1), _rec(3e-3, 1, acc=0.1, loss=5.0)]
    pick = select_lr(recs)
    assert pick["lr"] == 1e-3 and pick["metric"] == "acc" and not pick["edge"]
    assert pick["by_lr"][1e-3] == pytest.approx(0.85)


def test_lower_is_better_for_bits_per_byte_and_a_diverged_rate_loses_and_the_edge_is_flagged():
    recs = [_rec(1e-3, 0, bpb=2.0, loss=1.4), _rec(1e-2, 0, bpb=1.5, loss=1.0), _rec(1e-1, 0, bpb=math.nan,
                                                                                 loss=math.nan)]
    pick = select_lr(recs)
    assert pick["lr"] == 1e-2 and pick["metric"] == "bpb" and not pick["edge"]
    pick = select_lr(recs[:2])
    assert pick["lr"] == 1e-2 and pick["edge"]  # the best is the largest rate tried: widen the sweep


def test_mean_sd_and_a_t_based_95_percent_interval():
    d = describe([1.0, 2.0, 3.0])
    half = 4.303 * 1.0 / math.sqrt(3)  # t_{0.975}(2) = 4.303, sd = 1
    assert d["n"] == 3 and d["mean"] == 2.0 and d["sd"] == pytest.approx(1.0)
    assert d["ci95"] == pytest.approx([2.0 - half, 2.0 + half])
    assert t_quantile_975(1) == pytest.approx(12.706) and 1.96 <= t_quantile_975(500) < t_quantile_975(30)
    one = describe([0.5])
    assert one["sd"] is None and one["ci95"] is None
    assert fmt_stat(one) == "0.500 (n=1)" and fmt_ci(one) == "–" and fmt_stat(d) == "2.000 ± 1.000"


def test_the_cache_key_follows_the_config_not_labels_threads_or_device():
    base = {"model": "v6", "model_options": {"n_embd": 64}, "data": {"task": "mqar"}, "steps": 10, "lr": 1e-3,
            "seed": 0}
    k = cell_key(base, [])
    assert k == cell_key({**base, "threads": 4, "device": "cuda:1", "progress": False}, [])
    for change in ({"lr": 2e-3}, {"seed": 1}, {"steps": 11}, {"model_options": {"n_embd": 32}},
                   {"data": {"task": "mqar", "num_pairs": 4}}):
        assert cell_key({**base, **change}, []) != k, change
    assert cell_key(base, [4]) != k
