"""Task kinds (core/kinds/): each one file, registered by its name; the regression kind's criterion, metrics and
standardisation against their definitions and scikit-learn, its exported model in the target's units (ONNX Runtime
against eager), and a table's regression target from params.yaml, with the mistakes it can hold named."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

from helpers import small_model
from tessera.core.config import ModelConfig, parse_params
from tessera.core.data.files import BadSample
from tessera.core.data.shards import ShardedSplit
from tessera.core.errors import UserError
from tessera.core.kinds import KINDS
from tessera.core.kinds import regression
from tessera.core.stages.export import Deployable, check_parity, eager_outputs, traced, write_config, write_format
from tessera.core.stages.prepare import prepare_data
from tessera.core.tasks.multitask import build_model
from tessera.modalities import REGISTRY, build_task_model, task_kind

ROOT = Path(__file__).parents[1]


def test_each_kind_is_one_file_registered_by_its_name():
    """Adding a kind is core/kinds/<name>.py ending in KIND: the registry lists every such file, by its own name."""
    files = {f.stem for f in (ROOT / "core/kinds").glob("*.py")} - {"__init__", "kind"}
    assert files == set(KINDS) == {"classification", "regression", "contrastive"}
    for name, kind in KINDS.items():
        assert kind.name == name and kind.headline in kind.metric_names, name


def test_each_modality_task_names_a_kind_and_a_table_chooses_its_own_from_params():
    cfg = ModelConfig()
    kinds = {m: task_kind(m, cfg).name for m in REGISTRY}
    assert set(kinds.values()) <= {*KINDS, "detection"} and "classification" in kinds.values()
    assert task_kind("tabular", ModelConfig(tabular={"kind": "regression"})) is KINDS["regression"]


def stats_cfg(mean: list[float], std: list[float], **tabular) -> ModelConfig:
    return ModelConfig(**small_model(tabular={"numeric": ["a", "b"], "mean": [0.0, 0.0], "std": [1.0, 1.0],
                                              "kind": "regression", **tabular}),
                       targets={"tabular": {"mean": mean, "std": std}})


def test_the_criterion_is_the_mean_squared_error_of_standardised_values():
    mean, std = [150.0, -3.0], [75.0, 0.5]
    criterion = KINDS["regression"].criterion(stats_cfg(mean, std), "tabular", 2)
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(8, 2, generator=g) * 50 + 100, torch.randn(8, 2, generator=g) * 50 + 100
    m, s = torch.tensor(mean), torch.tensor(std)
    expected = (((pred - m) / s - (target - m) / s) ** 2).mean()
    assert torch.allclose(criterion({"pred_value": pred}, target)["loss_mse"], expected, rtol=1e-5)
    assert criterion.weight_dict == {"loss_mse": 1.0}


def test_metrics_match_scikit_learn_in_target_units():
    rng = np.random.default_rng(0)
    y = rng.normal(150, 75, 97)
    p = y + rng.normal(0, 40, 97)
    metric = KINDS["regression"].metric(ModelConfig(), "tabular", 1, True)
    for part in np.array_split(np.arange(97), 4):  # over batches, as validation feeds it
        metric.update({"pred_value": torch.tensor(p[part, None], dtype=torch.float32)},
                      torch.tensor(y[part, None], dtype=torch.float32))
    got = metric.compute()
    assert set(got) == set(KINDS["regression"].metric_names)
    assert got["r2"] == pytest.approx(r2_score(y, p), abs=1e-5)
    assert got["mae"] == pytest.approx(mean_absolute_error(y, p), rel=1e-5)
    assert got["rmse"] == pytest.approx(math.sqrt(mean_squared_error(y, p)), rel=1e-5)
    scatter = metric.details(["progression"], 11)["scatter"]
    assert "confusion" not in metric.details(["progression"], 11)
    assert scatter["name"] == "progression" and np.allclose(scatter["actual"], y, atol=1e-4)


def test_training_statistics_standardise_and_the_head_answers_in_target_units():
    y = np.random.default_rng(1).normal(150, 75, (50, 1)).astype(np.float32)
    add = KINDS["regression"].statistics()
    for row in y:
        assert add(row) is None
    stats = add(None)
    assert stats["mean"] == pytest.approx([y.mean()], rel=1e-5) and stats["std"] == pytest.approx([y.std()], rel=1e-4)
    head = KINDS["regression"].head(stats_cfg(stats["mean"], stats["std"]), "tabular", 1)
    states = torch.randn(4, 3, 32)
    z = head.fc(states[:, 0])  # the standardised prediction of the [CLS] state
    assert torch.allclose(head(states)["pred_value"], z * stats["std"][0] + stats["mean"][0], atol=1e-4)
    # what the criterion standardises, the head de-standardises: a round trip gives the target back
    t = torch.tensor(y[:4])
    assert torch.allclose((t - head.mean) / head.std * head.std + head.mean, t, atol=1e-4)


def test_the_exported_model_answers_in_target_units_as_the_eager_one_does(tmp_path):
    cfg = stats_cfg([150.0], [75.0])
    torch.manual_seed(0)
    net = Deployable(build_task_model("tabular", cfg, 1), "tabular", "regression", cfg).eval()
    assert net.output_names == ["value"]
    x = (torch.randn(9, 2),)
    write_config(tmp_path, "tabular", net, ["progression"], [])
    write_format("onnx", tmp_path, net, x, traced(net, x), 18)
    parity = check_parity("onnx", tmp_path, net, [x], eager_outputs(net, [x]))
    assert parity["onnx_max_abs_diff"] < 1e-3 and "onnx_argmax_agree" not in parity
    with torch.no_grad():
        value = net(*x)[0]
        z = net.net.head.fc(net.net.backbone(*net.net.adapter(numeric=x[0])[:1])[:, 0])
    assert torch.allclose(value, z * 75 + 150, atol=1e-3)  # target units: the standardised output x std + mean
    config = json.loads((tmp_path / "config.json").read_text())
    records = KINDS[config["head"]].records(["r1"], [value.numpy()], config, 5)
    assert records == [{"source": "r1", "value": pytest.approx(float(value[0, 0]), abs=1e-5)}]


def table_params(tmp_path: Path, csv: Path, **tabular):
    return parse_params({"model": small_model(tabular={"label": "y", "kind": "regression", **tabular}),
                         "prepare": {"root": str(tmp_path), "out": str(tmp_path / "prepared"),
                                     "metrics": str(tmp_path / "m.json"), "val_fraction": 0.0,
                                     "sources": {"tabular": {"format": "table", "train": str(csv)}}}})


def test_a_regression_table_prepares_numbers_and_its_training_statistics_reach_the_model(tmp_path):
    rows = [(i, 10.0 * i + 3) for i in range(30)] + [(30, "n/a")]  # one stray word: that row is quarantined
    csv = tmp_path / "t.csv"
    csv.write_text("x,y\n" + "".join(f"{x},{y}\n" for x, y in rows))
    meta = prepare_data(table_params(tmp_path, csv))["tabular"]
    assert meta["classes"] == ["y"] and meta["kind"] == "regression"
    assert [q["reason"] for q in meta["quarantine"]] == [
        "column 'y' is the regression target (model.tabular.kind), and 'n/a' is not a number"]
    train = ShardedSplit(tmp_path / "prepared/tabular", "train")
    y = np.array([float(s["label"][0]) for s in train])
    assert meta["target_stats"] == {"mean": [pytest.approx(y.mean())], "std": [pytest.approx(y.std())]}
    model = build_model(table_params(tmp_path, csv).model, tmp_path / "prepared", ["tabular"], None)
    assert model.heads["tabular"].mean.tolist() == pytest.approx([y.mean()], rel=1e-6)
    assert model.cfg.targets["tabular"]["std"] == pytest.approx([y.std()])


def test_a_regression_target_of_words_stops_prepare_naming_the_file_the_column_and_the_fix(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("x,y\n" + "".join(f"{i},{'big' if i % 2 else 'small'}\n" for i in range(20)))
    with pytest.raises(UserError, match=r"t\.csv: column 'y' is the regression target .* 20 of its 20 rows hold no "
                                        r"number .*model\.tabular\.kind: classification"):
        prepare_data(table_params(tmp_path, csv))


def test_a_regression_target_is_a_finite_number_or_a_bad_sample():
    assert regression.target("2.5", ["y"]).tolist() == [2.5]
    for bad in ("seven", "nan", "inf", "1e39"):
        with pytest.raises(BadSample):
            regression.target(bad, ["y"])
