"""A CPU smoke run of the benchmark (the figures themselves are measured in benchmarks/, never in tests)."""

import sys

import numpy as np
import torch

from helpers import ROOT
from tessera.core.entry.bench import bench
from tessera.core.entry.flops import forward_flops


def test_bench_compares_the_same_architecture_against_timm():
    rows = bench(size="debug", img_size=32, patch=8, batch=2, steps=1, warmup=0, rounds=1, device="cpu")
    ours, ref = rows
    assert (ours["model"], ref["model"]) == ("tessera", "timm")
    assert ours["gflops"] == ref["gflops"] > 0  # same function, same work
    assert ref["train_ratio"] == ref["infer_ratio"] == 1.0
    for r in rows:
        assert r["train_img_s"] > 0 and r["infer_img_s"] > 0 and 0 < r["train_mfu"] < 2


def test_forward_flops_count_attention_as_its_two_matmuls():
    """q k^T and the weights times v, 2 B H L^2 Dh FLOPs each: torch's counter has no formula for the fused CPU
    kernel, and without the math backend attention would count 0."""

    class Attention(torch.nn.Module):
        def forward(self, x):  # [B, H, L, Dh]
            return torch.nn.functional.scaled_dot_product_attention(x, x, x)

    assert forward_flops(Attention(), {"x": torch.randn(2, 4, 50, 8)}) == 2 * (2 * 2 * 4 * 50 * 50 * 8)


def test_few_labels_keeps_a_stratified_share_of_every_class_and_at_least_one_of_each():
    """benchmarks/few_labels.py's label split: each class keeps its share of labels (rounded, never none), a seed
    draws the same rows, another seed others; validation takes a tenth of the kept rows, at least one."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from few_labels import keep_labels, val_rows

    y = np.repeat(np.arange(10), [180, 170, 160, 150, 140, 130, 120, 110, 100, 3])  # the last class nearly absent
    for fraction in (0.05, 0.2, 1.0):
        kept = keep_labels(y, fraction, seed=0)
        per_class = np.bincount(y[kept], minlength=10)
        assert per_class.tolist() == [max(1, round(fraction * n)) for n in np.bincount(y)]
        assert (keep_labels(y, fraction, seed=0) == kept).all()
    assert (keep_labels(y, 0.2, seed=1) != keep_labels(y, 0.2, seed=0)).any()
    assert keep_labels(y, 1.0, seed=3).all()

    labelled = y[keep_labels(y, 0.05, seed=0)]  # 64 rows, the last class once
    is_val = val_rows(labelled, seed=0)
    assert len(labelled) == 64 and is_val.sum() == 6
    assert val_rows(np.array([0, 1, 1]), seed=0).sum() == 1  # at least one, unstratified where a class is single
