"""Unlabelled sources (prepare.sources.<modality>.unlabelled): prepared into a split of their own with the
modality's reading and quarantine, drawn by pretraining beside the training inputs, and refused with the file, the
key and the fix where they carry labels, lie nowhere, or feed no task."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tessera.core.config import parse_params
from tessera.core.data.files import hash_split, text_hash
from tessera.core.data.shards import ShardedSplit
from tessera.core.errors import UserError
from tessera.core.stages.prepare import prepare_data
from tessera.core.stages.pretrain import pretrain_model, with_unlabelled
from tessera.modalities.text import load_tokenizer
from helpers import small_model

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def params_for(tmp_path: Path, sources: dict, tasks: list[str], **pretrain):
    return parse_params({
        "model": small_model(), "tasks": {t: {"inputs": [t]} for t in tasks},
        "prepare": {"root": str(tmp_path), "out": str(tmp_path / "prepared"), "metrics": str(tmp_path / "prepare.json"),
                    "val_fraction": 0.2, "sources": sources},
        "pretrain": {"enabled": True, "steps": 6, "out": str(tmp_path / "pre"), "metrics": str(tmp_path / "pre.json"),
                     **pretrain},
        "train": {"batch_size": 8, "warmup_steps": 1, "eval_every": 3, "num_workers": 0, "out": str(tmp_path / "train")}})


LABELLED = [{"text": f"{WORDS[i % 10]} {WORDS[i // 10]} is {'even' if i % 2 == 0 else 'odd'}",
             "label": "even" if i % 2 == 0 else "odd"} for i in range(60)]
A_VAL_TEXT = next(r["text"] for r in LABELLED if hash_split("train", text_hash(r["text"]), 0.2, 0, True) == "val")


def text_source(tmp_path: Path, unlabelled: list[dict]) -> dict:
    """60 labelled sentences (two classes), 10 test ones, and the given unlabelled rows."""
    test = [{"text": f"{WORDS[i]} is held out", "label": "even" if i % 2 == 0 else "odd"} for i in range(10)]
    return {"format": "jsonl", "train": jsonl(tmp_path / "text/train.jsonl", LABELLED),
            "test": jsonl(tmp_path / "text/test.jsonl", test),
            "unlabelled": jsonl(tmp_path / "text/unlabelled.jsonl", unlabelled)}


def test_an_unlabelled_jsonl_is_prepared_into_its_own_split_quarantined_like_any_source_and_pretrained_on(tmp_path):
    rows = [{"text": f"{WORDS[i % 10]} and {WORDS[i // 10]}", "split": "test"} for i in range(30)]
    # quarantined: an empty text, none, a test sentence, a validation one
    rows += [{"text": "  "}, {"note": "no text"}, {"text": "three is held out"}, {"text": A_VAL_TEXT}]
    params = params_for(tmp_path, {"text": text_source(tmp_path, rows)}, ["text"])
    prepare_data(params)

    counts = json.loads((tmp_path / "prepare.json").read_text())["text"]
    assert counts["unlabelled"] == {"in": 34, "prepared": 30, "quarantined": 4}  # a `split` column is not read
    assert counts["train"]["in"] + counts["val"]["in"] == 60 and counts["test"]["in"] == 10
    reasons = {q["path"]: q["reason"] for q in map(json.loads, open(tmp_path / "prepared/quarantine.jsonl"))
               if q["split"] == "unlabelled"}
    assert reasons["text/unlabelled.jsonl:31"] == "empty text"
    assert reasons["text/unlabelled.jsonl:32"] == "missing field 'text'"
    assert "the same content as a held-out (test) sample" in reasons["text/unlabelled.jsonl:33"]
    assert "the same content as a held-out (val) sample" in reasons["text/unlabelled.jsonl:34"]

    folder = tmp_path / "prepared/text"
    train = ShardedSplit(folder, "train")
    pooled = with_unlabelled(train, folder)
    assert len(pooled) == len(train) + 30
    batch = pooled.gather(torch.tensor([0, len(pooled) - 1]))
    assert "label" not in batch  # the unlabelled samples have none, so pretraining's batches carry none
    tok = load_tokenizer(folder / "tokenizer.json")
    last = batch["ids"][1, : int(batch["ids_lengths"][1])].tolist()
    assert tok.decode(last).strip() == rows[29]["text"]

    summary = pretrain_model(params)
    assert summary["unlabelled"] == {"text": 30} and summary["steps"] == 6
    assert json.loads((tmp_path / "pre/pretrain.json").read_text())["unlabelled"] == {"text": 30}


def png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(path)


def test_an_unlabelled_folder_of_images_is_prepared_flat_and_a_broken_image_quarantined(tmp_path):
    for c in range(2):
        for i in range(4):
            png(tmp_path / f"images/train/{c}/{i}.png", 40 * c + i)
    for i in range(5):
        png(tmp_path / f"images/more/{i}.png", 200 + i)
    (tmp_path / "images/more/broken.png").write_bytes(b"\x89PNG not really")
    params = params_for(tmp_path, {"image": {"format": "imagefolder", "train": str(tmp_path / "images/train"),
                                             "unlabelled": str(tmp_path / "images/more")}}, ["image"])
    prepare_data(params)
    meta = json.loads((tmp_path / "prepared/image/meta.json").read_text())
    assert meta["counts"]["unlabelled"] == {"in": 6, "prepared": 5, "quarantined": 1}
    assert meta["classes"] == ["0", "1"]  # the unlabelled files add no class
    (q,) = [q for q in meta["quarantine"] if q["split"] == "unlabelled"]
    assert q["path"] == "images/more/broken.png" and "not a readable image" in q["reason"]


def test_unlabelled_sources_that_carry_labels_lie_nowhere_or_feed_no_task_stop_with_the_file_and_the_fix(tmp_path):
    with pytest.raises(UserError, match=r"text/unlabelled.jsonl:2: column 'label' holds labels, but "
                                        r"prepare.sources.text.unlabelled .* drop the column, or declare the file as "
                                        r"prepare.sources.text.train"):
        prepare_data(params_for(tmp_path, {"text": text_source(tmp_path, [{"text": "a"}, {"text": "b", "label": "x"}])},
                                ["text"]))

    table = tmp_path / "table/more.csv"
    table.parent.mkdir()
    table.write_text("x,colour,label\n1.5,red,\n")  # a label column, even empty, is one
    with pytest.raises(UserError, match=r"table/more.csv:2: column 'label' holds labels.*prepare.sources.tabular.train"):
        prepare_data(params_for(tmp_path, {"tabular": {"format": "table", "train": str(table), "unlabelled": str(table)}},
                                ["tabular"]))

    png(tmp_path / "flat/train/a/0.png", 1)
    png(tmp_path / "flat/more/cat/0.png", 2)
    with pytest.raises(UserError, match=r"flat/more: holds sub-folders \(cat/\), which are class folders.*move the "
                                        r"files up into .*, or declare the folder as prepare.sources.image.train"):
        prepare_data(params_for(tmp_path, {"image": {"format": "imagefolder", "train": str(tmp_path / "flat/train"),
                                                     "unlabelled": str(tmp_path / "flat/more")}}, ["image"]))

    text = {"format": "jsonl", "train": jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": "x"}])}
    with pytest.raises(UserError, match=r"nowhere.jsonl: no such file or folder \(prepare.sources.text.unlabelled\)"):
        prepare_data(params_for(tmp_path, {"text": {**text, "unlabelled": str(tmp_path / "nowhere.jsonl")}}, ["text"]))

    with pytest.raises(UserError, match=r"prepare.sources.image.unlabelled: no task reads image \(tasks: \['text'\]\).*"
                                        r"add a task of image, or remove the key"):
        params_for(tmp_path, {"text": text, "image": {"format": "imagefolder", "train": str(tmp_path / "flat/train"),
                                                      "unlabelled": str(tmp_path / "flat/train")}}, ["text"])

    with pytest.raises(UserError, match=r"prepare.sources.detection.unlabelled: format 'coco' has no unlabelled form"):
        prepare_data(params_for(tmp_path, {"detection": {"format": "coco", "train": str(tmp_path / "t.jsonl"),
                                                         "unlabelled": str(tmp_path / "t.jsonl")}}, ["detection"]))

    with pytest.raises(UserError, match=r"prepare.sources.text.unlabelled: .* lies outside prepare.root"):  # unversioned
        params_for(tmp_path / "text", {"text": {"format": "jsonl", "train": str(tmp_path / "text/train.jsonl"),
                                                "unlabelled": str(table)}}, ["text"])

    with pytest.raises(UserError, match=r"prepare.sources.shop: unlabelled: a records source has no unlabelled form"):
        params_for(tmp_path, {"shop": {"format": "records", "train": str(table), "target": "label",
                                       "unlabelled": str(table)}}, ["shop"])


def test_an_unlabelled_table_is_read_with_the_training_columns_and_a_category_they_lack_is_quarantined(tmp_path):
    table = tmp_path / "table/train.csv"
    table.parent.mkdir()
    table.write_text("x,colour,label\n" + "".join(f"{i / 10},{'red' if i % 2 else 'blue'},{i % 2}\n" for i in range(20)))
    (tmp_path / "table/more.csv").write_text("x,colour,note\n0.5,red,a\n0.7,green,b\nnan,blue,c\n")
    params = params_for(tmp_path, {"tabular": {"format": "table", "train": str(table),
                                               "unlabelled": str(tmp_path / "table/more.csv")}}, ["tabular"])
    prepare_data(params)
    meta = json.loads((tmp_path / "prepared/tabular/meta.json").read_text())
    assert meta["counts"]["unlabelled"] == {"in": 3, "prepared": 1, "quarantined": 2}
    reasons = {q["path"]: q["reason"] for q in meta["quarantine"]}
    assert "unknown category 'green' in column 'colour'" in reasons["table/more.csv:3"]
    assert reasons["table/more.csv:4"] == "column 'x' is numeric, and 'nan' is not a finite number"
    sample = ShardedSplit(tmp_path / "prepared/tabular", "unlabelled")[0]  # the extra column `note` is not read
    assert "label" not in sample and sample["categorical"].tolist() == [1]  # red, of ['blue', 'red']
    torch.testing.assert_close(sample["numeric"], torch.tensor([0.5]))
