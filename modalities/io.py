"""How each modality reads a user's input to predict on, declared in its infer.py as one `ModalityIO`
(core/modality.py): what `tessera predict`, `tessera serve` and `tessera explain` import. Training never does."""

from __future__ import annotations

from tessera.core.modality import ModalityIO
from tessera.modalities.audio import infer as audio
from tessera.modalities.detection import infer as detection
from tessera.modalities.image import infer as image
from tessera.modalities.tabular import infer as tabular
from tessera.modalities.text import infer as text

READERS: dict[str, ModalityIO] = {m.name: m for m in (image.IO, audio.IO, text.IO, detection.IO, tabular.IO)}
