"""How each modality draws its input with the relevance over it, declared in its draw.py as one `Drawing`
(core/modality.py): what explanations (the evaluation report, `tessera explain`) import. Training never does."""

from __future__ import annotations

from tessera.core.modality import Drawing
from tessera.modalities.audio import draw as audio
from tessera.modalities.detection import draw as detection
from tessera.modalities.image import draw as image
from tessera.modalities.tabular import draw as tabular
from tessera.modalities.text import draw as text

DRAWINGS: dict[str, Drawing] = {m.name: m for m in (image.DRAWING, audio.DRAWING, text.DRAWING, detection.DRAWING,
                                                    tabular.DRAWING)}
