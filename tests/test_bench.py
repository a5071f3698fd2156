"""A CPU smoke run of the benchmark (the figures themselves are measured in benchmarks/, never in tests)."""

from tessera.core.entry.bench import bench


def test_bench_compares_the_same_architecture_against_timm():
    rows = bench(size="debug", img_size=32, patch=8, batch=2, steps=1, warmup=0, rounds=1, device="cpu")
    ours, ref = rows
    assert (ours["model"], ref["model"]) == ("tessera", "timm")
    assert ours["gflops"] == ref["gflops"] > 0  # same function, same work
    assert ref["train_ratio"] == ref["infer_ratio"] == 1.0
    for r in rows:
        assert r["train_img_s"] > 0 and r["infer_img_s"] > 0 and 0 < r["train_mfu"] < 2
