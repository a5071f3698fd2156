"""Evaluation metrics against hand-computed values."""

import torch

from tessera.core.kinds.classification import classification_details
from tessera.core.kinds.contrastive import retrieval_metrics
from tessera.modalities.detection import pr_curve as detection_pr_curve
from tessera.core.stages.report import metrics_table


def one_hot_logits(predicted: list[int], classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(predicted), classes).float() * 5


def test_per_class_precision_recall_and_confusion_match_a_hand_count():
    actual = torch.tensor([0, 0, 0, 1, 1, 2])
    predicted = [0, 0, 1, 1, 2, 2]
    d = classification_details(one_hot_logits(predicted, 3), actual, ["a", "b", "c"], pr_points=11)
    assert d["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]  # rows: true class
    # a: 2 of 2 predicted right, 2 of 3 found; b: 1 of 2, 1 of 2; c: 1 of 2, 1 of 1
    expect = {"a": (1.0, 2 / 3, 3), "b": (0.5, 0.5, 2), "c": (0.5, 1.0, 1)}
    for row in d["per_class"]:
        p, r, n = expect[row["class"]]
        assert abs(row["precision"] - p) < 1e-6 and abs(row["recall"] - r) < 1e-6 and row["support"] == n
    assert d["predicted"] == predicted and d["actual"] == actual.tolist()


def test_micro_pr_curve_ends_at_full_recall_and_starts_at_the_base_rate():
    actual = torch.tensor([0, 1, 2, 0])
    d = classification_details(one_hot_logits([0, 1, 2, 1], 3), actual, ["a", "b", "c"], pr_points=11)
    p, r = d["pr"]["precision"], d["pr"]["recall"]
    # threshold 0: every (sample, class) pair is positive: recall 1, precision = 4 positives / 12 pairs
    assert abs(r[0] - 1.0) < 1e-6 and abs(p[0] - 1 / 3) < 1e-6
    # a middling threshold keeps the 4 argmax pairs, 3 of them right
    assert abs(p[5] - 0.75) < 1e-6 and abs(r[5] - 0.75) < 1e-6


def test_detection_pr_curve_averages_only_classes_with_ground_truth():
    precision = -torch.ones(10, 101, 3, 4, 3)  # [IoU, recall, class, area, max dets], -1: no ground truth
    precision[0, :, 0, 0, -1] = 1.0
    precision[0, :, 2, 0, -1] = 0.5
    curve = detection_pr_curve({"precision": precision})
    assert len(curve["recall"]) == 101 and curve["recall"][-1] == 1.0
    assert all(abs(p - 0.75) < 1e-6 for p in curve["precision"])


def test_retrieval_recall_and_median_rank():
    gallery = torch.eye(3)  # items of labels 0, 1, 2
    query = torch.tensor([[1.0, 0, 0], [1.0, 0.5, 0], [0, 0.2, 1.0]])  # labels 0, 1, 1: ranks 1, 2, 2
    m = retrieval_metrics(query, gallery, torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2]))
    assert abs(m["r1"] - 1 / 3) < 1e-6 and m["r5"] == 1.0 and m["median_rank"] == 2.0


def test_metrics_table_groups_keys_by_task():
    table = metrics_table({"image.accuracy": 0.5, "align.a_to_b_median_rank": 3.0})
    assert "| image | accuracy 0.5000 |" in table and "| align | a_to_b_median_rank 3 |" in table


def test_a_query_whose_label_the_gallery_lacks_is_left_out_and_counted():
    """Image classes {0, 1}, audio classes {0, 1, 2}: an audio query of class 2 has nothing to find. Counted as a
    rank-1 hit (argmax over an all-false row is 0), a random model would score R@1 0.75 on the case below."""
    gallery = torch.eye(2)  # labels 0, 1
    query = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])  # labels 0, 1, 2, 2
    m = retrieval_metrics(query, gallery, torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1]))
    assert m["unmatched"] == 2 and m["r1"] == 0.5 and m["r5"] == 1.0 and m["median_rank"] == 1.0  # ranks 2, 1
    none = retrieval_metrics(query[2:], gallery, torch.tensor([2, 2]), torch.tensor([0, 1]))
    assert none == {"r1": 0.0, "r5": 0.0, "median_rank": None, "unmatched": 2}
    empty = retrieval_metrics(query, gallery[:0], torch.tensor([0, 1, 2, 2]), torch.tensor([], dtype=torch.long))
    assert empty == {"r1": 0.0, "r5": 0.0, "median_rank": None, "unmatched": 4}


def test_pairing_by_label_refuses_a_class_that_one_modality_lacks_either_way():
    import pytest

    from tessera.core.errors import UserError
    from tessera.core.tasks.datasets import PairedByLabel

    class Split:
        def __init__(self, labels):
            self.meta = {"classes": ["zero", "one", "two"]}
            self._labels = torch.tensor(labels)

        def labels(self):
            return self._labels

        def __len__(self):
            return len(self._labels)

        def gather(self, indices, buffers=None):
            return {"label": self._labels[torch.as_tensor(indices)]}

    images, audio = Split([0, 1, 1, 0]), Split([0, 1, 2, 2])
    with pytest.raises(UserError, match=r"train split, classes \['two'\] have audio samples but no image samples"):
        PairedByLabel(images, audio, names=("image", "audio", "train"))
    with pytest.raises(UserError, match=r"classes \['two'\] have audio samples but no image samples"):
        PairedByLabel(audio, images, names=("audio", "image", "train"))
    assert len(PairedByLabel(images, Split([1, 0]), names=("image", "audio", "train"))) == 4
    # a held-out split may lack a class on one side: its samples are left out of the pairs, not paired wrongly
    held_out = PairedByLabel(audio, images, names=("audio", "image", "val"))
    assert held_out.labels().tolist() == [0, 1]
    pairs = held_out.gather([0, 1])
    assert torch.equal(pairs["a"]["label"], pairs["b"]["label"])