"""Reading an image to predict on (`tessera predict`, `tessera serve`, `tessera explain`): a file or its bytes,
decoded as prepare decodes it (`load_image`), refused past the caller's pixel limit. Detection reads the same."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tessera.core.data.files import BadSample, open_binary
from tessera.core.modality import InputLimits, ModalityIO
from tessera.modalities.image import SUFFIXES, load_image, open_header


def read_image(source: Path | bytes, c: dict, limits: InputLimits,
               name: str | None = None) -> Iterator[tuple[str, object, str | None]]:
    """One image -> (name, (uint8 [C, S, S], its own (width, height)), error); `c` is its model config section."""
    name = name or str(source)
    try:
        pixels = load_image(source, c["img_size"], c["in_chans"], limits.max_image_pixels, key=limits.key("max_image_pixels"))
        with open_binary(source) as f, open_header(f) as im:  # the header again, for its own size
            yield name, (pixels, im.size), None
    except BadSample as e:
        yield name, None, str(e)


def predict_io(config: dict, section: str, limits: InputLimits):
    """(read, batch) for an exported model of images (section: its model config key)."""
    return (lambda source, name=None: read_image(source, config["model"][section], limits, name),
            lambda items: (np.stack([pixels for pixels, _ in items]),))


IO = ModalityIO(
    name="image",
    suffixes=SUFFIXES,
    predict_io=lambda config, folder, limits: predict_io(config, "image", limits),
)
