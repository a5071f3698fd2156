"""A fused task (issue 25, section 3): `train.tasks` naming a records source trains one classifier over every input
of its records (core/nn/fusion.py) in the shared backbone, evaluated like any classifier, from params.yaml alone."""

import csv
import io
import json
import re
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from rich.console import Console

from helpers import free_port, small_model, tessera, wait_for
from test_records import shop

from tessera.core.config import ServeConfig, parse_params
from tessera.core.data.batching import to_device
from tessera.core.data.records import RecordsSplit
from tessera.core.entry.explain import explain_files
from tessera.core.entry.predict import Predictor
from tessera.core.errors import UserError
from tessera.core.serve.app import build_app
from tessera.core.stages.evaluate import evaluate_model
from tessera.core.stages.export import FORMATS, export_models, exported_inputs, load_deployable, parity_batches
from tessera.core.stages.prepare import prepare_data
from tessera.core.stages.train import run_signature, train_model
from tessera.core.tasks.datasets import PairedBySample, collate_task
from tessera.core.tasks.explain import FRACTIONS
from tessera.core.tasks.metrics import headline, reported_metrics
from tessera.core.tasks.multitask import build_model, load_trained, model_card
from tessera.core.nn.weights import read_state_dict
from tessera.modalities import REGISTRY, audio, image
from tessera.modalities.records import input_values
from tessera.modalities.tabular import read_table
from tessera.modalities.text import load_tokenizer

QUIET = Console(file=io.StringIO())


PAIR = {"kind": "contrastive", "inputs": ["shop.photo", "shop.caption"]}
"""A contrastive task by sample: each record's photo with its own caption"""


OWN = {"shop.photo": {"img_size": 16, "augment": False}}
"""The photos' own settings (model.inputs): twice the image section's 8 px, unaugmented"""


def params(tmp_path: Path, table: Path, mapping: dict | None = None, inputs: dict | None = None, **train):
    """The shop records trained as `mapping` (the tasks mapping), or as train.tasks [shop] by default; `inputs`:
    model.inputs."""
    return parse_params({"tasks": mapping or {}, "model": small_model(text={"vocab_size": 300}, inputs=inputs or {}), "prepare": {
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
    few steps as the fused task `shop` with modality dropout, the photos' own settings (OWN), and two contrastive tasks by sample (`photo_caption`,
    `clip_caption`: several pairs in one run, the caption's adapter shared by both), and evaluated."""
    tmp_path = tmp_path_factory.mktemp("fused")
    p = params(tmp_path, shop(tmp_path, n=40), {"shop": {"inputs": ["shop"]}, "photo_caption": PAIR,
                                               "clip_caption": {"kind": "contrastive", "inputs": ["shop.clip", "shop.caption"]}},
               OWN, modality_dropout={"shop": {"photo": 0.3, "caption": 0.2}})
    prepare_data(p, QUIET)
    summary = train_model(p, QUIET)
    return tmp_path, p, summary, evaluate_model(p, QUIET)


def test_a_records_source_in_train_tasks_trains_and_evaluates_as_one_fused_classifier(trained):
    tmp_path, p, summary, metrics = trained
    retrieval = {f"{t}.{q}_to_{g}_{k}" for t, a in (("photo_caption", "photo"), ("clip_caption", "clip"))
                 for q, g in ((a, "caption"), ("caption", a)) for k in ("r1", "r5", "median_rank", "unmatched")}
    assert set(metrics) == reported_metrics(["shop"], p.pairs(), True, p.model) == {
        "shop.accuracy", "shop.macro_f1", "shop.deletion_auc", "shop.deletion_auc_random", *retrieval}
    assert json.loads((tmp_path / "eval.json").read_text()) == metrics
    assert summary["val"]["headline"] == headline(summary["val"], ["shop"], p.pairs(), p.model) == \
        pytest.approx((summary["val"]["shop.accuracy"] + summary["val"]["photo_caption.photo_to_caption_r1"]
                       + summary["val"]["clip_caption.clip_to_caption_r1"]) / 3)
    assert "| shop | accuracy" in (tmp_path / "reports" / "eval.md").read_text()
    model = load_trained(p.train.out)
    assert list(model.inputs("shop")) == ["photo", "clip", "caption", "table"]  # every input, in the table's order
    assert "shop" in model.adapters and not {"image", "audio", "text", "tabular"} & set(model.adapters)
    assert model.embedder("photo_caption", "caption").adapter is model.embedder("clip_caption", "caption").adapter


def test_the_report_explains_the_fused_task_with_each_inputs_share_of_the_relevance_and_its_map(trained):
    tmp_path, _, _, metrics = trained
    report = (tmp_path / "reports" / "eval.md").read_text()
    assert "![explanations of shop](figures/explain_shop.png)" in report
    assert (tmp_path / "reports" / "figures" / "explain_shop.png").read_bytes()[:4] == b"\x89PNG"
    line = next(x for x in report.splitlines() if x.startswith("Each input's share of the relevance"))
    shares = dict(re.findall(r"(\w+) ([\d.]+) \(\d+ of \d+ records\)", line))
    assert list(shares) == ["photo", "clip", "caption", "table"] and all(0 <= float(v) <= 1 for v in shares.values())
    assert -1 <= metrics["shop.deletion_auc"] <= 1 and -1 <= metrics["shop.deletion_auc_random"] <= 1
    for order in ("attribution", "random"):
        rows = json.loads((tmp_path / "reports" / "plots" / "deletion" / f"shop-{order}.json").read_text())
        assert [r["fraction"] for r in rows] == list(FRACTIONS)


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
    for name, m in loaded.inputs("shop").items():  # each input's adapter: its own settings and prepared folder's
        own = p.model.for_input(f"shop.{name}", m).model_copy(deep=True)
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


def test_a_records_input_is_prepared_and_built_with_its_own_settings_and_the_modalitys_task_keeps_the_section(trained):
    tmp_path, p, _, _ = trained
    assert p.model.image.img_size == 8 and p.model.image.augment
    photos = RecordsSplit(Path(p.prepare.out) / "shop", "train").gather(torch.arange(4))["photo"]
    assert photos["image"].shape[-2:] == (16, 16)  # prepared at its own size
    model = load_trained(p.train.out)
    photo = model.adapters["shop"].adapters["photo"]
    assert photo.grid_size == (4, 4) and not photo.augment
    assert model.adapters["shop:photo"].grid_size == (4, 4)  # the contrastive side: the same input, the same settings


def test_model_inputs_names_a_records_input_and_keys_its_modality_has(tmp_path):
    table = shop(tmp_path, n=20)
    with pytest.raises(UserError, match=r"model.inputs names 'shop'.*no input <source>.<input> of a records source"):
        params(tmp_path, table, inputs={"shop": {"augment": False}})
    params(tmp_path, table, inputs={"scenes.image": {"augment": False}})  # no such source: ignored, as model.audio is
    p = params(tmp_path, table, inputs={"shop.picture": {"augment": False}})
    prepare_data(p, QUIET)
    with pytest.raises(UserError, match=r"model.inputs names \['shop.picture'\], which are not inputs of shop; its inputs are \['photo', "):
        build_model(p.model, Path(p.prepare.out), ["shop"], None)
    p = params(tmp_path, table, inputs={"shop.photo": {"agument": False}})
    with pytest.raises(UserError, match=r"model.inputs.shop.photo sets \['agument'\], which model.image .* does not have"):
        prepare_data(p, QUIET)
    p = params(tmp_path, table, inputs={"shop.photo": {"img_size": "large"}})
    with pytest.raises(UserError, match=r"model.inputs.shop.photo: .*img_size"):
        prepare_data(p, QUIET)


@pytest.fixture(scope="module")
def exported(trained):
    """The trained fused task exported (`tessera export`): its export.json figures."""
    return export_models(trained[1], QUIET)


def test_a_fused_task_exports_as_one_model_over_every_input_and_present_with_parity_on_records_lacking_inputs(trained, exported):
    tmp_path, p, _, _ = trained
    metrics = exported
    sides = ["photo_caption_photo", "photo_caption_caption", "clip_caption_clip", "clip_caption_caption"]
    assert set(metrics) == {f"{t}.samples" for t in ["shop", *sides]} | {
        f"shop.{f}_argmax_agree" for f in FORMATS} | {f"{t}.{f}_max_abs_diff" for t in ["shop", *sides] for f in FORMATS}
    assert all(metrics[f"shop.{f}_argmax_agree"] == 1.0 for f in FORMATS)
    # each side of a pair by sample is its input's embedder, on that input's own data facts (the caption's tokenizer)
    assert all(metrics[f"{t}.{f}_max_abs_diff"] < p.export.atol for t in sides for f in FORMATS)
    caption = json.loads((Path(p.export.out) / "photo_caption_caption" / "config.json").read_text())
    assert caption["modality"] == "text" and (Path(p.export.out) / "photo_caption_caption" / "tokenizer.json").read_bytes() == \
        (tmp_path / "prepared" / "shop" / "caption" / "tokenizer.json").read_bytes()
    folder = Path(p.export.out) / "shop"
    config = json.loads((folder / "config.json").read_text())
    assert [i["name"] for i in config["inputs"]] == ["photo.images", "clip.waveform", "clip.lengths", "caption.input_ids",
                                                    "caption.pad_mask", "table.numeric", "table.categorical", "present"]
    assert [(i["name"], i["modality"], i["assets"]) for i in config["fused"]] == [
        ("photo", "image", []), ("clip", "audio", []), ("caption", "text", ["caption/tokenizer.json"]), ("table", "tabular", [])]
    own = tmp_path / "prepared" / "shop" / "caption" / "tokenizer.json"
    assert (folder / "caption" / "tokenizer.json").read_bytes() == own.read_bytes()  # the caption's own tokenizer
    split = RecordsSplit(Path(p.prepare.out) / "shop", p.evaluate.split)
    batches = parity_batches(split, "shop", p.export.parity_samples, load_trained(p.train.out).inputs("shop"))
    assert not torch.cat([b[-1] for b in batches]).all()  # the check saw records lacking an input
    model, everything = load_trained(p.train.out), split.gather(torch.arange(len(split)))
    trained_inputs, _ = to_device(collate_task("shop", None, everything, model.inputs("shop")), "cpu")
    with torch.no_grad():  # the exported inputs mean what the trained model's inputs mean
        want = model.task_model("shop")(**trained_inputs)["pred_logits"]
        assert torch.allclose(load_deployable(folder)(*exported_inputs(everything, "shop", model.inputs("shop")))[0], want, atol=1e-5)
    eager, program = load_deployable(folder), torch.export.load(folder / "model.pt2").module()
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for args in batches:
            want = eager(*args)[0]
            got = session.run(None, {n: a.numpy() for n, a in zip(eager.input_names, args)})[0]
            assert np.abs(got - want.numpy()).max() < p.export.atol
            assert (program(*args)[0] - want).abs().max() < p.export.atol
    example = eager.example(3)  # what bench-export times
    assert session.run(None, {n: a.numpy() for n, a in zip(eager.input_names, example)})[0].shape == (3, 2)


def test_predict_on_a_records_table_answers_each_row_as_the_eager_model_does_with_broken_cells_left_absent(trained, exported):
    tmp_path, p, _, _ = trained
    folder, table = Path(p.export.out) / "shop", tmp_path / "data" / "shop" / "records.csv"
    predictor, eager = Predictor(folder), load_deployable(folder)
    records = {r["source"].rsplit(":", 1)[1]: r for r in predictor.predict([table], top_k=2, threshold=0.5, batch_size=8)}
    assert len(records) == 40  # one per row, in order
    line = lambda i: str(i + 2)  # noqa: E731 (row i of the CSV is on line i + 2, under its header)
    assert records[line(3)]["absent"] == ["photo"] and records[line(4)]["absent"] == ["clip", "caption"]
    assert records[line(5)]["absent"] == ["photo"] and records[line(5)]["warnings"][0].startswith("photo: ")
    assert records[line(7)]["absent"] == ["table"] and "'price'" in records[line(7)]["warnings"][0]
    assert "prepare.max_image_pixels" in records[line(13)]["warnings"][0]
    assert records[line(8)] == {"source": f"{table}:{line(8)}", "error": "no usable input (every input's cell is empty)"}
    assert records[line(9)]["error"].startswith("no usable input (photo: ")
    assert records[line(0)]["absent"] == [] and "warnings" not in records[line(0)]
    cli = tessera("predict", str(folder), str(table), "--json", "--top-k", "2", check=False)
    assert cli.returncode == 1 and "Traceback" not in cli.stderr  # rows 8 and 9 have no usable input
    assert f"warning: {table}:{line(5)}: photo: " in cli.stderr and f"error: {table}:{line(8)}: no usable input" in cli.stderr
    assert [json.loads(x) for x in cli.stdout.splitlines()] == [r for r in records.values() if "error" not in r]
    for i in range(40):  # each row alone through the eager model, on what the predictor read of it
        r = records[line(i)]
        if "error" in r:
            continue
        row = next(row for n, row, _ in read_table(table) if str(n) == line(i))
        record = predictor.fused.read(input_values(row, predictor.fused.inputs), table.parent)
        with torch.no_grad():
            logits = eager(*(torch.from_numpy(a) for a in predictor.fused.batch([record])))[0][0]
        want = torch.softmax(logits.double(), 0)
        assert r["label"] == predictor.config["classes"][int(want.argmax())], i
        assert abs(r["score"] - float(want.max())) < 1e-4, i


def test_explain_on_a_records_table_draws_each_row_with_each_inputs_share_and_says_which_rows_it_could_not(trained, exported, tmp_path):
    _, p, _, _ = trained
    folder, source = Path(p.export.out) / "shop", Path(p.prepare.sources["shop"].train)
    rows = {n: row for n, row, _ in read_table(source)}
    table = tmp_path / "few.csv"  # rows 0 (every input), 3 (no photo), 4 (no clip nor caption), 5 (a broken photo),
    with open(table, "w", newline="") as f:  # 8 (every cell empty), 9 (only a broken photo); paths made absolute
        writer = csv.DictWriter(f, list(rows[2]))
        writer.writeheader()
        writer.writerows({k: str(source.parent / v) if k in ("photo", "clip") and v else v for k, v in rows[i + 2].items()}
                         for i in (0, 3, 4, 5, 8, 9))
    written, errors, warnings = explain_files(folder, [table], tmp_path / "out", "grad")  # what `tessera explain` runs
    assert errors[0] == f"{table}:6: no usable input (every input's cell is empty)" and len(errors) == 2
    assert errors[1].startswith(f"{table}:7: no usable input (photo: ") and warnings[0].startswith(f"{table}:5: photo: ")
    assert {x.name for x in written} == {x.name for x in (tmp_path / "out").iterdir()} == {
        f"few.csv_{n}.{e}" for n in range(2, 6) for e in ("png", "json")}
    predicted = {r["source"]: r for r in Predictor(folder).predict([table], top_k=2, threshold=0.5)}
    for n, absent in ((2, []), (3, ["photo"]), (4, ["clip", "caption"]), (5, ["photo"])):
        with Image.open(tmp_path / "out" / f"few.csv_{n}.png") as picture:
            assert picture.width > 2 * picture.height  # the four inputs side by side
            grey = np.asarray(picture.convert("L"))
        panels = np.array_split(grey < 200, 4, axis=1)  # the share of each input's panel that is drawn on
        for k, name in enumerate(("photo", "clip")):  # a picture's map fills its panel; an absent one's holds a word
            assert (panels[k].mean() < 0.05) == (name in absent), (n, name, panels[k].mean())
        facts = json.loads((tmp_path / "out" / f"few.csv_{n}.json").read_text())
        shares = facts["shares"]
        assert list(shares) == ["photo", "clip", "caption", "table"] and facts["absent"] == absent, n
        assert abs(sum(shares.values()) - 1) < 1e-5 and all(shares[a] == 0 for a in absent), n
        assert all(shares[k] > 0 for k in shares if k not in absent), n
        want = predicted[f"{table}:{n}"]  # read and predicted as `tessera predict` reads the row
        assert facts["label"] == want["label"] and abs(facts["score"] - want["score"]) < 1e-4, n
        assert facts.get("warnings") == want.get("warnings"), n


def form(row: dict, folder: Path) -> dict:
    """A records table's row as `tessera serve` takes it: a file per photo and clip, JSON for caption and table
    values, no field for an empty cell."""
    files = {k: (row[k], (folder / row[k]).read_bytes()) for k in ("photo", "clip") if row[k]}
    data = {"caption": json.dumps(row["caption"])} if row["caption"] else {}
    if row["price"] or row["colour"]:
        data["table"] = json.dumps({"price": row["price"], "colour": row["colour"]})
    return {"files": files, "data": data}


def test_serve_takes_a_record_as_a_form_with_a_field_per_input_batches_records_and_answers_as_predict(trained, exported):
    import httpx
    import uvicorn

    tmp_path, p, _, _ = trained
    folder, table = Path(p.export.out) / "shop", tmp_path / "data" / "shop" / "records.csv"
    rows = [row for _, row, _ in read_table(table)]
    want = [{k: v for k, v in r.items() if k != "source"} for r in Predictor(folder).predict([table], 3, 0.5)]
    app = build_app(Path(p.export.out), ServeConfig(max_wait_ms=300, max_batch=8))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning", log_config=None))
    thread = threading.Thread(target=server.run)
    thread.start()
    url = f"http://127.0.0.1:{server.config.port}"
    try:
        wait_for(lambda: _ready(url), 60, "the server ready", every=0.2)
        fields = httpx.get(f"{url}/info").json()["tasks"]["shop"]["fields"]
        assert fields == {"photo": {"files": sorted(image.SUFFIXES)}, "clip": {"files": sorted(audio.SUFFIXES)},
                          "caption": "json", "table": "json"}
        asked = [0, 3, 4, 5, 7, 11, 13, 14, 15, 16, 17]  # every input; no photo; no clip nor caption; broken photo; bad price
        with ThreadPoolExecutor(len(asked)) as pool:
            answers = list(pool.map(lambda i: httpx.post(f"{url}/predict/shop", **form(rows[i], table.parent), timeout=60), asked))
        for i, answer in zip(asked, answers):
            assert answer.status_code == 200, answer.text
            got = answer.json()
            assert got["absent"] == want[i]["absent"] and got["label"] == want[i]["label"], i
            assert abs(got["score"] - want[i]["score"]) < 1e-5, i
            assert [w.split(":")[0] for w in got.get("warnings", [])] == [w.split(":")[0] for w in want[i].get("warnings", [])]
        count = next(line for line in httpx.get(f"{url}/metrics").text.splitlines() if line.startswith('tessera_batch_size_count{task="shop"}'))
        assert float(count.split()[-1]) < len(asked)  # records of concurrent requests ran together
        only_broken = httpx.post(f"{url}/predict/shop", **form(rows[9], table.parent))
        assert only_broken.status_code == 422 and "no usable input (photo: " in only_broken.json()["detail"]
        wrong = httpx.post(f"{url}/predict/shop", files={"caption": ("c.txt", b"a red thing")})
        assert wrong.status_code == 400 and "takes a JSON value" in wrong.json()["detail"]
        unknown = httpx.post(f"{url}/predict/shop", data={"picture": "1"}, files={"photo": ("0.png", (table.parent / rows[0]["photo"]).read_bytes())})
        assert unknown.status_code == 422 and "inputs are photo, clip, caption, table" in unknown.json()["detail"]
        assert httpx.post(f"{url}/predict/shop", json={"caption": "x"}).status_code == 415
    finally:
        server.should_exit = True
        thread.join(30)


def _ready(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/ready").status_code == 200
    except httpx.TransportError:
        return False


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
