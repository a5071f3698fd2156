"""Reading an image to detect in (`tessera predict`, `tessera serve`, `tessera explain`): read as images are
(modalities/image/infer.py); each prediction is the image's boxes in its own pixels."""

from __future__ import annotations

import numpy as np

from tessera.core.modality import ModalityIO
from tessera.modalities.image.infer import SUFFIXES, predict_io


def records(sources: list[str], items: list, outputs: list[np.ndarray], config: dict, threshold: float) -> list[dict]:
    """predict: each image's boxes scoring at least `threshold`, best first, xyxy in the file's own pixels (clipped
    to the image: a box the model extends past an edge ends at it)."""
    _, scores, labels, boxes = outputs
    side, classes, result = config["model"]["detection"]["img_size"], config["classes"], []
    for s, (_, (w, h)), sc, lb, bx in zip(sources, items, scores, labels, boxes):
        order = np.argsort(-sc)
        keep = order[sc[order] >= threshold]
        scale = np.array([w, h, w, h], dtype=np.float32) / side
        result.append({"source": s, "boxes": [{"label": classes[lb[q]], "score": round(float(sc[q]), 6),
                                               "box": [float(v) for v in (bx[q] * scale).clip(0, [w, h, w, h])]} for q in keep]})
    return result


IO = ModalityIO(
    name="detection",
    suffixes=SUFFIXES,
    predict_io=lambda config, folder, limits: predict_io(config, "detection", limits),
    records=records,
)
