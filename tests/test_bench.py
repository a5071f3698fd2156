"""A CPU smoke run of the benchmark (the figures themselves are measured in benchmarks/, never in tests)."""

import torch

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
