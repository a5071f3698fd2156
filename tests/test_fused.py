"""A fused task (issue 25, section 3): `train.tasks` naming a records source trains one classifier over every input
of its records (core/nn/fusion.py) in the shared backbone, evaluated like any classifier, from params.yaml alone."""

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console

from helpers import small_model
from test_records import shop

from tessera.core.config import parse_params
from tessera.core.data.batching import to_device
from tessera.core.data.records import RecordsSplit
from tessera.core.errors import UserError
from tessera.core.stages.evaluate import evaluate_model
from tessera.core.stages.export import export_models
from tessera.core.stages.prepare import prepare_data
from tessera.core.stages.train import run_signature, train_model
from tessera.core.tasks.datasets import PairedBySample, collate_task
from tessera.core.tasks.metrics import headline, reported_metrics
from tessera.core.tasks.multitask import build_model, load_trained, model_card
from tessera.core.nn.weights import read_state_dict
from tessera.modalities import REGISTRY
from tessera.modalities.text import load_tokenizer

QUIET = Console(file=io.StringIO())


PAIR = {"kind": "contrastive", "inputs": ["shop.photo", "shop.caption"]}
"""A contrastive task by sample: each record's photo with its own caption"""


def params(tmp_path: Path, table: Path, mapping: dict | None = None, **train):
    """The shop records trained as `mapping` (the tasks mapping), or as train.tasks [shop] by default."""
    return parse_params({"tasks": mapping or {}, "model": small_model(text={"vocab_size": 300}), "prepare": {
        "root": str(tmp_path / "data"), "out": str(tmp_path / "prepared"), "metrics": str(tmp_path / "m.json"),
        "val_fraction": 0.2, "test_fraction": 0.2,
        "sources": {"shop": {"format": "records", "train": str(table), "target": "label"}}},
        "train": {**({} if mapping else {"tasks": ["shop"]}), "epochs": 2, "batch_size": 8, "eval_every": 2, "warmup_steps": 1, "num_workers": 0,
                  "out": str(tmp_path / "train"), "metrics": str(tmp_path / "train.json"), **train},
        "evaluate": {"out": str(tmp_path / "reports"), "metrics": str(tmp_path / "eval.json")},
        "export": {"out": str(tmp_path / "export"), "metrics": str(tmp_path / "export.json")}})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The shop records (photo, clip, caption, price and colour; some cells empty or broken) prepared, trained for a
    few steps as the fused task `shop` with modality dropout and two contrastive tasks by sample (`photo_caption`,
    `clip_caption`: several pairs in one run, the caption's adapter shared by both), and evaluated."""
    tmp_path = tmp_path_factory.mktemp("fused")
    p = params(tmp_path, shop(tmp_path, n=40), {"shop": {"inputs": ["shop"]}, "photo_caption": PAIR,
                                               "clip_caption": {"kind": "contrastive", "inputs": ["shop.clip", "shop.caption"]}},
               modality_dropout={"shop": {"photo": 0.3, "caption": 0.2}})
    prepare_data(p, QUIET)
    summary = train_model(p, QUIET)
    return tmp_path, p, summary, evaluate_model(p, QUIET)


def test_a_records_source_in_train_tasks_trains_and_evaluates_as_one_fused_classifier(trained):
    tmp_path, p, summary, metrics = trained
    retrieval = {f"{t}.{q}_to_{g}_{k}" for t, a in (("photo_caption", "photo"), ("clip_caption", "clip"))
                 for q, g in ((a, "caption"), ("caption", a)) for k in ("r1", "r5", "median_rank", "unmatched")}
    assert set(metrics) == reported_metrics(["shop"], p.pairs(), True, p.model) == {"shop.accuracy", "shop.macro_f1", *retrieval}
    assert json.loads((tmp_path / "eval.json").read_text()) == metrics
    assert summary["val"]["headline"] == headline(summary["val"], ["shop"], p.pairs(), p.model) == \
        pytest.approx((summary["val"]["shop.accuracy"] + summary["val"]["photo_caption.photo_to_caption_r1"]
                       + summary["val"]["clip_caption.clip_to_caption_r1"]) / 3)
    assert "| shop | accuracy" in (tmp_path / "reports" / "eval.md").read_text()
    model = load_trained(p.train.out)
    assert list(model.inputs("shop")) == ["photo", "clip", "caption", "table"]  # every input, in the table's order
    assert "shop" in model.adapters and not {"image", "audio", "text", "tabular"} & set(model.adapters)
    assert model.embedder("photo_caption", "caption").adapter is model.embedder("clip_caption", "caption").adapter


def test_each_input_keeps_its_own_data_facts_in_the_model_card_and_none_in_the_run_config(trained):
    tmp_path, p, _, _ = trained
    card = json.loads((Path(p.train.out) / "model.json").read_text())
    facts = {i["name"]: i["config"] for i in card["fused"]["shop"]}
    vocab = load_tokenizer(tmp_path / "prepared" / "shop" / "caption" / "tokenizer.json").get_vocab_size()
    assert facts["caption"]["vocab_size"] == vocab
    assert facts["table"]["numeric"] == ["price"] and facts["table"]["categorical"] == ["colour"]
    assert facts["clip"]["norm_mean"] != p.model.audio.norm_mean  # the clips' own statistics
    assert card["model"] == p.model.model_dump()  # facts learnt from data stay out of the run's config
    assert (Path(p.train.out) / "assets" / "shop" / "caption" / "tokenizer.json").is_file()


def test_a_trained_fused_model_loads_back_with_the_same_outputs(trained, tmp_path):
    _, p, _, _ = trained
    model = build_model(p.model, Path(p.prepare.out), ["shop"], p.pairs()).eval()
    model.load_state_dict(read_state_dict(Path(p.train.out) / "model.safetensors"))
    (tmp_path / "model.json").write_text(json.dumps(model_card(model)))
    (tmp_path / "model.safetensors").write_bytes((Path(p.train.out) / "model.safetensors").read_bytes())
    loaded = load_trained(tmp_path)
    split = RecordsSplit(Path(p.prepare.out) / "shop", "train")
    inputs, _ = to_device(collate_task("shop", None, split.gather(torch.arange(len(split))), model.inputs("shop")), "cpu")
    assert not inputs["present"].all()  # records lacking an input are among them
    with torch.no_grad():
        assert torch.equal(model.task_model("shop")(**inputs)["pred_logits"], loaded.task_model("shop")(**inputs)["pred_logits"])
    for name, m in loaded.inputs("shop").items():  # each input's adapter is the one its own prepared folder makes
        own = p.model.model_copy(deep=True)
        folder = Path(p.prepare.out) / "shop" / name
        if REGISTRY[m].from_data:
            REGISTRY[m].from_data(own, folder, json.loads((folder / "meta.json").read_text()))
        shapes = lambda module: {k: v.shape for k, v in module.state_dict().items()}  # noqa: E731
        assert shapes(loaded.adapters["shop"].adapters[name]) == shapes(REGISTRY[m].adapter(own)), name


def test_modality_dropout_names_a_fused_tasks_inputs(tmp_path):
    table = shop(tmp_path, n=20)
    with pytest.raises(UserError, match=r"train.modality_dropout names 'image'.*records source in train.tasks"):
        params(tmp_path, table, modality_dropout={"image": {"photo": 0.1}})
    with pytest.raises(UserError, match=r"train.tasks names 'shops'.*neither a modality.*nor a records source"):
        params(tmp_path, table, tasks=["shops"])
    p = params(tmp_path, table, modality_dropout={"shop": {"picture": 0.1}})
    prepare_data(p, QUIET)
    with pytest.raises(UserError, match=r"modality_dropout.shop names \['picture'\].*inputs are \['photo', 'clip', 'caption', 'table'\]"):
        build_model(p.model, Path(p.prepare.out), ["shop"], None, p.train.modality_dropout)
    model = build_model(p.model, Path(p.prepare.out), ["shop"], None, {"shop": {"clip": 0.25}})
    assert model.adapters["shop"].dropout.tolist() == [0.0, 0.25, 0.0, 0.0]


def test_export_refuses_a_fused_task_naming_it(trained):
    _, p, _, _ = trained
    with pytest.raises(UserError, match="shop is a fused task.*not supported yet"):
        export_models(p, QUIET)


def test_a_changed_input_or_records_index_changes_the_run_signature_so_training_never_resumes_stale_data(trained, tmp_path):
    _, p, _, _ = trained
    shutil.copytree(p.prepare.out, tmp_path / "prepared")
    p = p.model_copy(update={"prepare": p.prepare.model_copy(update={"out": str(tmp_path / "prepared")})})
    before = run_signature(p, [])
    meta = tmp_path / "prepared" / "shop" / "caption" / "meta.json"
    meta.write_text(meta.read_text().replace('"key": "', '"key": "x'))
    changed_input = run_signature(p, [])
    shutil.copy(tmp_path / "prepared" / "shop" / "records-val.safetensors", tmp_path / "prepared" / "shop" / "records-train.safetensors")
    assert len({before, changed_input, run_signature(p, [])}) == 3


def test_a_contrastive_task_by_sample_pairs_each_record_with_its_own_partner_and_leaves_out_records_lacking_one(trained):
    _, p, _, metrics = trained
    records = RecordsSplit(Path(p.prepare.out) / "shop", "train")
    pairs = PairedBySample(records, "photo", "caption")
    k = [records.inputs.index("photo"), records.inputs.index("caption")]
    both = (records.rows[:, k] >= 0).all(1)
    assert pairs.index.tolist() == torch.nonzero(both).flatten().tolist() and 0 < len(pairs) < len(records)
    batch, whole = pairs.gather(torch.arange(len(pairs))), records.gather(pairs.index)
    for side, name in zip("ab", ("photo", "caption")):  # pair i: record index[i]'s own photo and its own caption
        assert all(torch.equal(batch[side][f], whole[name][f]) for f in batch[side])
    assert torch.equal(pairs.labels(), torch.arange(len(pairs)))  # retrieval's only hit is the own partner
    assert 0 <= metrics["photo_caption.caption_to_photo_r1"] <= metrics["photo_caption.caption_to_photo_r5"] <= 1
