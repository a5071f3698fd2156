"""Contrastive tasks as their own kind (issue 25, sections 2 and 4): retrieval counted against a brute-force
definition, and the `tasks:` mapping of params.yaml (today's train.tasks / train.align translated into it, and one
message per mistake). Pairing by sample, and a train + evaluate of it, are in tests/test_fused.py."""

import pytest
import torch

from tessera.core.config import parse_params
from tessera.core.errors import UserError
from tessera.core.kinds.contrastive import RetrievalMetric
from tessera.core.stages.train import check_data

SHOP = {"shop": {"format": "records", "train": "data/raw/shop.csv", "target": "label"}}


def brute_force(q: torch.Tensor, g: torch.Tensor) -> dict:
    """Query i's own partner is gallery item i; its rank is 1 + the gallery items more similar to it than that."""
    ranks = []
    for i in range(len(q)):
        own = float(q[i] @ g[i])
        ranks.append(1 + sum(float(q[i] @ g[j]) > own for j in range(len(g))))
    ranks = sorted(ranks)
    return {"r1": sum(r <= 1 for r in ranks) / len(ranks), "r5": sum(r <= 5 for r in ranks) / len(ranks),
            "median_rank": float(ranks[(len(ranks) - 1) // 2]), "unmatched": 0}


def test_retrieval_by_sample_counts_only_the_own_partner_over_the_whole_gallery():
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(37, 8), dim=1)
    b = torch.nn.functional.normalize(a + 0.8 * torch.randn(37, 8), dim=1)  # each near its own partner, not always
    metric = RetrievalMetric(("photo", "caption"))
    for s in range(0, 37, 10):  # batches of 10: ranks are over all 37, never within a batch
        metric.update({"photo": a[s: s + 10]}, {"photo": torch.arange(s, min(37, s + 10))})
    metric.update({"caption": b}, {"caption": torch.arange(37)})
    got = metric.compute()
    for (q, g), (eq, eg) in {("photo", "caption"): (a, b), ("caption", "photo"): (b, a)}.items():
        want = brute_force(eq, eg)
        assert {k: got[f"{q}_to_{g}_{k}"] for k in want} == pytest.approx(want)
        assert 0 < want["r1"] < 1 and want["median_rank"] > 1  # a case where the definition matters
    # Two records with the same class are two different records: a gallery item of the query's class is no hit
    same = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1]]), dim=1)
    m = RetrievalMetric(("a", "b"))
    m.update({"a": same, "b": same.flip(0)}, {"a": torch.arange(2), "b": torch.arange(2)})
    assert m.compute()["a_to_b_r1"] == 0.0


def parse(mapping=None, **train):
    return parse_params({"tasks": mapping or {}, "prepare": {"sources": SHOP}, "train": train})


def test_train_tasks_and_align_load_as_the_tasks_mapping():
    p = parse(tasks=["image", "shop"], align=["audio", "image"])
    assert {t: (c.kind, c.inputs) for t, c in p.tasks.items()} == {
        "image": (None, ["image"]), "shop": (None, ["shop"]), "align": ("contrastive", ["audio", "image"])}
    assert p.pairs() == {"align": ("audio", "image")} and p.train.tasks == ["image", "shop"]
    assert parse(tasks=["image"]).pairs() == {}
    mapping = parse({"image": {"inputs": ["image"]}, "image_text": {"kind": "contrastive", "inputs": ["audio", "image"]},
                     "photo_caption": {"kind": "contrastive", "inputs": ["shop.photo", "shop.caption"]}},
                    weights={"photo_caption": 2.0})
    assert mapping.train.tasks == ["image"]
    assert mapping.pairs() == {"image_text": ("audio", "image"), "photo_caption": ("shop.photo", "shop.caption")}


@pytest.mark.parametrize("tasks, train, message", [
    ({"pair": {"kind": "contrastive", "inputs": ["image", "audio", "text"]}}, {},
     r"tasks.pair.inputs: tasks.pair.inputs names \['image', 'audio', 'text'\]: a contrastive task aligns two different inputs"),
    ({"pair": {"kind": "contrastive", "inputs": ["shop.photo", "image"]}}, {},
     r"tasks.pair.inputs: .*not one of each"),
    ({"pair": {"kind": "contrastive", "inputs": ["shops.photo", "shops.caption"]}}, {},
     r"tasks.pair.inputs: .*two inputs of one records source in prepare.sources \(\['shop'\]\)"),
    ({"pair": {"kind": "contrastive", "inputs": ["audio", "image"], "target": "label"}}, {},
     r"tasks.pair.target: a contrastive task has none"),
    ({"image": {"kind": "contrastive", "inputs": ["audio", "image"]}}, {}, r"tasks.image: .*name it after what it aligns, e.g. audio_image"),
    ({"pets": {"inputs": ["image"]}}, {}, r"tasks.pets.inputs: .* is \[image\].*rename the task image"),
    ({"image": {"inputs": ["image", "text"]}}, {}, r"tasks.image.inputs: .*reads one modality or one records source"),
    ({"image": {"inputs": ["image"]}}, {"align": ["audio", "image"]}, r"tasks: .*remove train.tasks and train.align"),
    ({"image": {"inputs": ["image"]}}, {"weights": {"align": 2.0}}, r"train.weights: .* names \['align'\], which are not tasks"),
])
def test_each_mistake_in_the_tasks_mapping_is_one_message_naming_the_key(tasks, train, message):
    with pytest.raises(UserError, match=message) as e:
        parse(tasks, **train)
    assert len(str(e.value).splitlines()) == 1 and str(e.value).startswith("params.yaml: ")


def test_a_task_whose_kind_is_not_its_inputs_own_stops_training_before_any_data_is_read(tmp_path):
    for kind in ("regression", "ranking"):
        p = parse_params({"tasks": {"image": {"kind": kind, "inputs": ["image"]}},
                          "prepare": {"out": str(tmp_path / "nothing")}})
        with pytest.raises(UserError, match=rf"tasks.image.kind is {kind}, but image's task is classification"):
            check_data(p)
