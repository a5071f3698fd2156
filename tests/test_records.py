"""Records: a table whose rows are samples and whose columns are inputs of several modalities (issue 25, section 1),
prepared column by column by each modality's own loader, and read back as one split of records."""

import csv
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from PIL import Image

from helpers import png_header_only

from tessera.core.config import describe_params, parse_params
from tessera.core.data.files import ESCAPES, SPLITS
from tessera.core.data.records import RecordsSplit
from tessera.core.data.shards import ShardedSplit
from tessera.core.errors import UserError
from tessera.core.stages.prepare import prepare_data

COLOURS = ("red", "blue", "green")


def shop(tmp_path: Path, n: int = 30, suffix: str = ".csv") -> Path:
    """tmp_path/data/shop/records.csv (or .jsonl, .parquet): n records (photo, clip, caption, price, colour, label) with real PNGs and WAVs,
    and the hard cases at fixed rows: 3 no photo; 4 no caption nor clip; 5 a broken photo; 6 a photo outside the
    root; 7 a price that is no number; 11 a photo beside the table's folder; 12 a FIFO for a clip; 13 a pixel bomb; 8 every cell empty; 9 only a broken photo; 10 no target."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "data" / "shop"
    (folder / "img").mkdir(parents=True)
    (folder / "aud").mkdir()
    Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(tmp_path / "outside.png")
    (folder / "img" / "broken.png").write_bytes(b"not a png at all")
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(folder / "img" / f"{i}.png")
        sf.write(folder / "aud" / f"{i}.wav", rng.uniform(-0.5, 0.5, 800 + 40 * i), 16000, subtype="PCM_16")
        rows.append({"photo": f"img/{i}.png", "clip": f"aud/{i}.wav", "caption": f"a {COLOURS[i % 3]} thing, number {i}",
                     "price": f"{1.5 * i}", "colour": COLOURS[i % 3], "label": "ab"[i % 2]})
    rows[3]["photo"] = ""
    rows[4]["caption"] = rows[4]["clip"] = ""
    rows[5]["photo"] = "img/broken.png"
    rows[6]["photo"] = "../../outside.png"  # exists: only the escape keeps it out
    rows[7]["price"] = "cheap"
    (folder.parent / "shared").mkdir()
    (folder / "img" / "11.png").rename(folder.parent / "shared" / "11.png")
    rows[11]["photo"] = "../shared/11.png"  # outside the table's folder, inside prepare.root: read
    rows[8] = {**{k: "" for k in rows[8]}, "label": "a"}
    rows[9] = {**{k: "" for k in rows[9]}, "photo": "img/broken.png", "label": "b"}
    rows[10]["label"] = ""
    os.mkfifo(folder / "aud" / "fifo.wav")
    rows[12]["clip"] = "aud/fifo.wav"
    png_header_only(folder / "img" / "bomb.png", 20000, 20000)
    rows[13]["photo"] = "img/bomb.png"
    if suffix == ".jsonl":  # numbers as JSON numbers, empty cells as nulls
        (folder / "records.jsonl").write_text("".join(json.dumps({k: (float(v) if k == "price" and v.replace(".", "", 1).isdigit() else v or None)
                                                                  for k, v in r.items()}) + "\n" for r in rows))
    elif suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), folder / "records.parquet")
    else:
        with open(folder / "records.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return folder / f"records{suffix}"


def params_for(tmp_path: Path, table: Path, columns: dict | None = None, **model):
    return parse_params({"model": model, "prepare": {
        "root": str(tmp_path / "data"), "out": str(tmp_path / "prepared"), "metrics": str(tmp_path / "m.json"),
        "val_fraction": 0.2, "test_fraction": 0.2,
        "sources": {"shop": {"format": "records", "train": str(table), "columns": columns, "target": "label"}}}})


@pytest.fixture
def prepared(tmp_path):
    table = shop(tmp_path)
    metas = prepare_data(params_for(tmp_path, table))
    return tmp_path, metas["shop"]


def quarantined(tmp_path: Path) -> dict[int, dict]:
    """Line of the table (1: the header) -> its quarantine entries, by column (None: the record itself)."""
    found: dict[int, dict] = {}
    for line in (tmp_path / "prepared" / "quarantine.jsonl").read_text().splitlines():
        q = json.loads(line)
        assert q["path"].startswith("shop/records.csv:")  # named relative to prepare.root, as every sample is
        found.setdefault(int(q["path"].rsplit(":", 1)[1]), {})[q.get("column")] = q["reason"]
    return found


def test_columns_are_inferred_and_each_is_prepared_by_its_modality(prepared):
    tmp_path, meta = prepared
    assert meta["inputs"] == [{"name": "photo", "modality": "image", "columns": {"photo": "image"}},
                              {"name": "clip", "modality": "audio", "columns": {"clip": "audio"}},
                              {"name": "caption", "modality": "text", "columns": {"caption": "text"}},
                              {"name": "table", "modality": "tabular",
                               "columns": {"price": "numeric", "colour": "categorical"}}]
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert set(metrics) == {"shop", "shop.photo", "shop.clip", "shop.caption", "shop.table"}
    for counts in metrics.values():  # nothing lost, per column and split
        assert all(c["in"] == c["prepared"] + c["quarantined"] for c in counts.values())
    assert sum(c["in"] for c in metrics["shop"].values()) == 30
    assert sum(c["prepared"] for c in metrics["shop"].values()) == 30 - 3  # rows 8, 9 and 10
    assert (tmp_path / "prepared" / "shop" / "caption" / "tokenizer.json").is_file()  # the modality's own assets


def test_every_column_of_a_record_lands_in_the_records_split(prepared):
    tmp_path, meta = prepared
    folder = tmp_path / "prepared" / "shop"
    split_of: dict[str, set] = {}
    for inp in meta["inputs"]:
        m = json.loads((folder / inp["name"] / "meta.json").read_text())
        for s in SPLITS:
            for f in m["splits"][s]:
                for name in json.loads((folder / inp["name"] / (f + ".json")).read_text()):
                    split_of.setdefault(name, set()).add(s)
    assert len(split_of) == 27 and all(len(s) == 1 for s in split_of.values())
    assert {s for splits in split_of.values() for s in splits} == set(SPLITS)  # the hash did choose splits


def test_a_broken_cell_is_quarantined_with_its_column_and_the_record_goes_on_without_it(prepared):
    tmp_path, meta = prepared
    q = quarantined(tmp_path)
    assert "not a readable image" in q[7]["photo"]  # line = row + 2 (the header is line 1)
    assert ESCAPES in q[8]["photo"]
    assert "'price' is numeric, and 'cheap' is not a finite number" in q[9]["table"]
    assert q[10] == {None: "no usable input: every cell is empty or quarantined"}
    assert set(q[11]) == {"photo", None} and q[11][None].startswith("no usable input")
    assert q[12] == {None: "no target in column 'label'"}
    assert "not a regular file" in q[14]["clip"] and "exceeds prepare.max_image_pixels" in q[15]["photo"]
    assert set(q) == {7, 8, 9, 10, 11, 12, 14, 15}  # an empty cell is no fault: rows 3 and 4 are not here
    present = {}
    for s in SPLITS:
        split = RecordsSplit(tmp_path / "prepared" / "shop", s)
        for i, p in enumerate(split.gather(range(len(split)))["present"].tolist()):
            present[(s, i)] = p
    rows = sorted(present.values())
    # photo, clip, caption, table: rows 3, 5, 6, 13 lack the photo, 4 the clip and caption, 7 the table, 12 the clip
    assert rows.count([True, True, True, True]) == 20 and rows.count([True, False, True, True]) == 1  # 12
    assert rows.count([False, True, True, True]) == 4 and rows.count([True, False, False, True]) == 1
    assert rows.count([True, True, True, False]) == 1


def test_records_split_gathers_every_input_with_a_present_mask_and_the_records_labels(prepared):
    tmp_path, meta = prepared
    folder = tmp_path / "prepared" / "shop"
    split = RecordsSplit(folder, "train")
    n = len(split)
    assert n == meta["counts"]["train"]["prepared"] and split.starts[0] == 0 and split.starts[-1] == n
    batch = split.gather(list(range(n)))
    assert batch["present"].shape == (n, 4) and batch["present"].dtype.is_floating_point is False
    assert batch["photo"]["image"].shape == (n, 1, 16, 16)
    assert batch["clip"]["waveform"].shape[0] == n and batch["clip"]["waveform_lengths"].min() > 0  # placeholders too
    assert batch["caption"]["ids"].shape[0] == n and batch["table"]["numeric"].shape == (n, 1)
    assert batch["table"]["categorical"].shape == (n, 1) and "label" not in batch["photo"]
    assert split.labels().tolist() == batch["label"].tolist()
    # a record's label is its own target, and its cells are its own: the photo column's label of the same record
    rows = split.rows
    photo_labels = json.loads((folder / "photo" / "meta.json").read_text())
    photos = ShardedSplit(folder / "photo", "train")
    has = rows[:, 0] >= 0
    assert has.sum() > 0 and photo_labels["classes"] == meta["classes"] == ["a", "b"]
    assert photos.gather(rows[has, 0])["label"].tolist() == batch["label"][has].tolist()
    names = [nm for f in photos.files for nm in json.loads((folder / "photo" / (f + ".json")).read_text())]
    for i in has.nonzero().flatten().tolist():
        line = int(names[int(rows[i, 0])].rsplit(":", 1)[1])  # the record's own photo: its line's target
        assert meta["classes"][batch["label"][i]] == "ab"[(line - 2) % 2]


def test_changing_image_preprocessing_reprepares_only_the_image_column(prepared):
    tmp_path, first = prepared
    table = tmp_path / "data" / "shop" / "records.csv"
    again = prepare_data(params_for(tmp_path, table, image={"img_size": 24, "patch_size": 4}))["shop"]
    assert {k: m["cached"] for k, m in again["parts"].items()} == {
        "shop.photo": False, "shop.clip": True, "shop.caption": True, "shop.table": True}
    batch = RecordsSplit(tmp_path / "prepared" / "shop", "train").gather([0])
    assert batch["photo"]["image"].shape == (1, 1, 24, 24)


def test_a_column_declared_as_one_kind_that_holds_another_stops_prepare_naming_the_table_column_and_fix(tmp_path):
    table = shop(tmp_path)
    kinds = {"photo": "image", "clip": "audio", "price": "numeric", "colour": "categorical"}
    with pytest.raises(UserError) as e:
        prepare_data(params_for(tmp_path, table, {**kinds, "caption": "image"}))
    assert str(table) in str(e.value) and "'caption' is declared image" in str(e.value) and "declare it text" in str(e.value)
    with pytest.raises(UserError) as e:
        prepare_data(params_for(tmp_path, table, {**kinds, "caption": "text", "colour": "numeric"}))
    assert "'colour' is declared numeric" in str(e.value) and "declare it categorical" in str(e.value)
    with pytest.raises(UserError, match="'size' is not a column kind"):
        prepare_data(params_for(tmp_path, table, {**kinds, "caption": "size"}))
    assert not (tmp_path / "prepared" / "shop").exists()  # stopped before anything was prepared
    table.write_text(table.read_text().replace("caption,", "the caption,", 1))  # inferred: no folder name
    with pytest.raises(UserError, match="'the caption' is prepared into a folder of its name"):
        prepare_data(params_for(tmp_path, table))


def test_a_records_source_is_checked_in_params_yaml(tmp_path):
    def source(name="shop", **src):
        return {"prepare": {"root": str(tmp_path), "sources": {name: {"format": "records", "train": str(tmp_path / "t.csv"), **src}}}}

    with pytest.raises(UserError, match="prepare.sources.shop.target: target must name the column"):
        parse_params(source())
    with pytest.raises(UserError, match="is a records source named like a modality"):
        parse_params(source("image", target="label"))
    with pytest.raises(UserError, match="columns and target are keys of a records source"):
        parse_params({"prepare": {"root": str(tmp_path), "sources": {"text": {
            "format": "jsonl", "train": str(tmp_path / "t.jsonl"), "target": "label"}}}})
    with pytest.raises(UserError, match="use letters, digits"):
        parse_params(source(target="label", columns={"my photo": "image"}))
    p = parse_params(source(target="label"))
    assert p.train.tasks == []  # records train through fused tasks, not as a modality's own task
    keys = {row["key"] for row in describe_params()}  # `tessera params` lists a source's keys
    assert {"prepare.sources.<name>.columns", "prepare.sources.<name>.target"} <= keys


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_jsonl_and_parquet_records_prepare_as_the_csv_does(prepared, suffix):
    tmp_path, csv_meta = prepared
    other = tmp_path / suffix.strip(".")
    table = shop(other, suffix=suffix)
    meta = prepare_data(params_for(other, table))["shop"]
    assert meta["inputs"] == csv_meta["inputs"] and meta["classes"] == csv_meta["classes"]
    assert sum(c["prepared"] for c in meta["counts"].values()) == 30 - 3  # a record's hash, so its split, may differ
    assert sum(len(RecordsSplit(other / "prepared" / "shop", s)) for s in SPLITS) == 27
