"""Tables: FT-Transformer feature tokens against their definition, column inference, quarantine with reasons,
CSV and Parquet alike, and a real table from scikit-learn's wheel trained, exported and predicted."""

import json
import math
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from helpers import small_model, tessera
from tessera.core.config import TabularConfig, parse_params
from tessera.core.data.shards import ShardedSplit
from tessera.core.stages.prepare import prepare_data
from tessera.core.data.files import BadSample, read_rows
from tessera.core.errors import UserError
from tessera.modalities.tabular import Relisted, TabularAdapter, category, encode_row, infer_columns


def filled(**kw) -> TabularConfig:
    return TabularConfig(**{"numeric": ["a", "b"], "categorical": ["c"], "mean": [1.0, -2.0], "std": [2.0, 0.5],
                            "categories": {"c": ["x", "y", "z"]}, **kw})


def test_each_feature_token_is_its_own_map_of_its_own_value():
    """token_j = (x_j - mean_j) / std_j * w_j + b_j for numeric j; E[offset_c + v] + b_c for categorical c; [CLS]
    first. Changing one feature changes its token alone."""
    c = filled()
    adapter = TabularAdapter(8, c, 0.0).eval()
    numeric, categorical = torch.tensor([[3.0, -1.0], [1.0, 0.0]]), torch.tensor([[2], [0]])
    tokens, pad = adapter(numeric, categorical)
    assert pad is None and tokens.shape == (2, 4, 8)
    z = (numeric - torch.tensor(c.mean)) / torch.tensor(c.std)
    for j in range(2):
        assert torch.allclose(tokens[:, 1 + j], z[:, j, None] * adapter.num_weight[j] + adapter.num_bias[j])
    assert torch.allclose(tokens[:, 3], adapter.cat_embed.weight[categorical[:, 0]] + adapter.cat_bias[0])
    assert torch.equal(tokens[:, 0], adapter.cls_token[0].expand(2, -1))
    moved, _ = adapter(numeric + torch.tensor([[5.0, 0.0]]), categorical)
    assert not torch.allclose(moved[:, 1], tokens[:, 1]) and torch.equal(moved[:, 2:], tokens[:, 2:])


def test_two_categorical_columns_use_their_own_rows_of_the_shared_table():
    c = TabularConfig(categorical=["p", "q"], categories={"p": ["a", "b"], "q": ["u", "v", "w"]})
    adapter = TabularAdapter(4, c, 0.0)
    tokens, _ = adapter(None, torch.tensor([[1, 2]]))
    assert torch.allclose(tokens[0, 2], adapter.cat_embed.weight[2 + 2] + adapter.cat_bias[1])  # q's rows start at 2


def test_columns_are_inferred_numeric_when_nine_in_ten_values_are_numbers():
    rows = [{"h": str(i), "colour": "red" if i % 2 else "blue", "n": "n/a" if i == 0 else i * 1.5} for i in range(20)]
    c = infer_columns(TabularConfig(), rows)
    assert c.numeric == ["h", "n"] and c.categorical == ["colour"] and c.categories == {"colour": ["blue", "red"]}
    assert c.mean[0] == pytest.approx(9.5) and c.std[0] == pytest.approx(np.std(range(20)))
    declared = infer_columns(TabularConfig(categorical=["h"]), rows)  # one list given: the other takes the rest
    assert declared.categorical == ["h"] and declared.numeric == ["colour", "n"]
    with pytest.raises(UserError, match=r"columns \['h'\] are declared both numeric and categorical"):
        infer_columns(TabularConfig(numeric=["h", "n"], categorical=["h"]), rows)
    with pytest.raises(UserError, match="no feature columns"):
        infer_columns(TabularConfig(), [{}, {}])


def test_inferring_the_columns_of_many_rows_holds_none_of_them():
    """The training rows are read again, not held: 100,000 rows as dicts would take ~30 MB (benchmarks/RESULTS.md,
    records at a million rows); what stays is a float64 per numeric value and the categories."""
    n = 100_000
    rows = Relisted(lambda: ({"price": str(i % 997 / 4), "colour": ("red", "blue")[i % 2]} for i in range(n)))
    tracemalloc.start()
    try:
        c = infer_columns(TabularConfig(), rows)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert c.numeric == ["price"] and c.categories == {"colour": ["blue", "red"]}
    assert c.mean[0] == pytest.approx(np.mean([i % 997 / 4 for i in range(n)]))
    assert peak < 8 * n + 2**20, f"{peak / 2**20:.1f} MB traced"


def test_values_read_alike_from_every_format_and_out_of_range_numbers_are_refused():
    assert category(1) == category("1") == category(1.0) == "1" and category(True) == category("True") == "true"
    c = TabularConfig(numeric=["a"], categorical=["k"], categories={"k": ["1", "true"]}, mean=[0.0], std=[1.0])
    assert encode_row({"a": "2.5", "k": 1.0}, c)["categorical"].tolist() == [0]
    for row, reason in (({"a": "1e39", "k": "1"}, "beyond float32's range"), ({"k": "1"}, "no column 'a'"),
                        ({"a": "inf", "k": "1"}, "not a finite number"), ({"a": 1, "k": "2"}, "unknown category '2'")):
        with pytest.raises(BadSample, match=reason):
            encode_row(row, c)


def test_a_csv_from_a_spreadsheet_reads_and_a_malformed_one_is_refused_or_quarantined(tmp_path):
    (tmp_path / "t.csv").write_bytes("\ufeffa,label\n1,x\n2,y,surplus\n".encode())  # Excel's byte-order mark
    rows = list(read_rows(tmp_path / "t.csv"))
    assert rows[0] == (2, {"a": "1", "label": "x"}, None) and rows[1] == (3, None, "3 fields, the header has 2")
    (tmp_path / "d.csv").write_text("a,a,label\n1,2,x\n")
    with pytest.raises(UserError, match=r"the header names \['a'\] more than once"):
        list(read_rows(tmp_path / "d.csv"))


def params_for(tmp_path: Path, train: Path, **tabular):
    return parse_params({"model": {"tabular": tabular},
                         "prepare": {"root": str(tmp_path), "out": str(tmp_path / "prepared"), "metrics": str(tmp_path / "m.json"),
                                     "val_fraction": 0.0, "sources": {"tabular": {"format": "table", "train": str(train)}}}})


ROWS = [
    ("1.5", "red", "yes", "train"),
    ("2.5", "blue", "no", "train"),
    ("3.0", "red", "no", "train"),
    ("", "blue", "yes", "train"),  # missing number
    ("12,5", "red", "yes", "train"),  # a number that is not one
    ("4.0", "green", "no", "test"),  # a category the training split never had
    ("5.0", "", "yes", "test"),  # missing category
    ("6.0", "blue", "yes", "test"),
]


def test_bad_rows_are_quarantined_with_their_reason_and_csv_and_parquet_prepare_alike(tmp_path):
    import csv as csv_module

    csv = tmp_path / "t.csv"
    with open(csv, "w", newline="") as f:
        csv_module.writer(f).writerows([("height", "colour", "label", "split"), *ROWS])
    metas = prepare_data(params_for(tmp_path, csv, numeric=["height"], categorical=["colour"]))
    meta = metas["tabular"]
    assert meta["counts"]["train"] == {"in": 5, "prepared": 3, "quarantined": 2}
    assert meta["counts"]["test"] == {"in": 3, "prepared": 1, "quarantined": 2}
    reasons = {q["path"].rsplit(":", 1)[1]: q["reason"] for q in meta["quarantine"]}
    assert reasons["5"] == "missing value in column 'height'"
    assert reasons["6"] == "column 'height' is numeric, and '12,5' is not a finite number"
    assert reasons["7"].startswith("unknown category 'green' in column 'colour'; the training split has ['blue', 'red']")
    assert reasons["8"] == "missing value in column 'colour'"
    from_csv = ShardedSplit(tmp_path / "prepared/tabular", "train")

    table = pa.table({"height": [float(r[0]) if r[0] and r[0] != "12,5" else None for r in ROWS],
                      "colour": [r[1] or None for r in ROWS], "label": [r[2] for r in ROWS], "split": [r[3] for r in ROWS]})
    pq.write_table(table, tmp_path / "t.parquet")
    metas = prepare_data(params_for(tmp_path, tmp_path / "t.parquet"))  # columns inferred this time
    from_parquet = ShardedSplit(tmp_path / "prepared/tabular", "train")
    assert metas["tabular"]["counts"]["train"] == {"in": 5, "prepared": 3, "quarantined": 2}  # the None rows
    for a, b in zip(from_csv, from_parquet):
        assert torch.equal(a["numeric"], b["numeric"]) and torch.equal(a["categorical"], b["categorical"])
    columns = json.loads((tmp_path / "prepared/tabular/columns.json").read_text())
    assert columns["numeric"] == ["height"] and columns["categories"] == {"colour": ["blue", "red"]}


@pytest.mark.slow
def test_a_real_table_trains_with_images_then_exports_and_predicts_like_the_eager_model(tmp_path):
    """The wine table from scikit-learn's wheel beside a small image task on one backbone; the exported tabular model
    predicts a CSV and a Parquet file of held-out rows as the trained model does."""
    import yaml
    from PIL import Image
    from sklearn.datasets import load_wine

    wine = load_wine()
    columns = [n.replace("/", "_") for n in wine.feature_names]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(wine.target))
    split = np.where(np.isin(np.arange(len(order)), order[:36]), "test", "")  # the rest: hash-split into train and val
    lines = [",".join(columns + ["label", "split"])]
    lines += [",".join([*map(repr, map(float, x)), wine.target_names[y], s]) for x, y, s in zip(wine.data, wine.target, split)]
    (tmp_path / "data").mkdir()
    (tmp_path / "data/wine.csv").write_text("\n".join(lines) + "\n")
    for c in range(2):  # two classes of flat grey images, bright and dark
        (tmp_path / f"data/images/{c}").mkdir(parents=True)
        for i in range(40):
            Image.fromarray(np.full((8, 8), 40 + 160 * c + i, np.uint8)).save(tmp_path / f"data/images/{c}/{i}.png")
    params = {
        "model": small_model(),
        "prepare": {"root": str(tmp_path / "data"), "out": str(tmp_path / "prepared"), "metrics": str(tmp_path / "prepare.json"),
                    "val_fraction": 0.15, "test_fraction": 0.0,  # the test split: the rows that say so
                    "sources": {"tabular": {"format": "table", "train": str(tmp_path / "data/wine.csv")},
                                                      "image": {"format": "imagefolder", "train": str(tmp_path / "data/images")}}},
        "train": {"epochs": 40, "batch_size": 16, "eval_every": 50, "warmup_steps": 10, "num_workers": 0,
                  "out": str(tmp_path / "train"), "metrics": str(tmp_path / "train.json")},
        "evaluate": {"split": "val", "out": str(tmp_path / "reports"), "metrics": str(tmp_path / "eval.json")},
        "export": {"out": str(tmp_path / "export"), "metrics": str(tmp_path / "export.json"), "parity_samples": 20},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in ("prepare", "train", "export"):
        tessera(stage, "-p", str(tmp_path / "params.yaml"), cwd=tmp_path)
    summary = json.loads((tmp_path / "train.json").read_text())
    test = summary["test"]  # the images have no test split here: their metrics are on val
    assert test["tabular.accuracy"] > 0.8 and summary["val"]["image.accuracy"] > 0.8  # chance: 0.40 and 0.5
    parity = json.loads((tmp_path / "export.json").read_text())
    assert parity["tabular.onnx_max_abs_diff"] < 1e-4 and parity["tabular.onnx_argmax_agree"] == 1.0

    held_out = [line for line, s in zip(lines[1:], split) if s == "test"]
    (tmp_path / "rows.csv").write_text(lines[0] + "\n" + "\n".join(held_out) + "\n")
    pq.write_table(pa.table({c: [float(line.split(",")[i]) for line in held_out] for i, c in enumerate(columns)}),
                   tmp_path / "rows.parquet")
    results = {}
    for name in ("rows.csv", "rows.parquet"):
        out = tessera("predict", str(tmp_path / "export/tabular"), str(tmp_path / name), "--json", cwd=tmp_path)
        results[name] = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["label"] for r in results["rows.csv"]] == [r["label"] for r in results["rows.parquet"]]
    truth = [line.split(",")[-2] for line in held_out]
    assert np.mean([r["label"] == t for r, t in zip(results["rows.csv"], truth)]) == pytest.approx(test["tabular.accuracy"], abs=1e-6)  # float32 metrics
    assert not math.isnan(results["rows.csv"][0]["score"])
