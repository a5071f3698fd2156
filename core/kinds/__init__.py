"""Every task kind Tessera knows that is not a modality's own: each declared in its file (core/kinds/<name>.py)
as one `TaskKind` (core/kinds/kind.py). Detection's kind is declared with its head in modalities/detection/."""

from __future__ import annotations

from tessera.core.kinds import classification, contrastive, regression
from tessera.core.kinds.kind import TaskKind

KINDS: dict[str, TaskKind] = {k.name: k for k in (classification.KIND, regression.KIND, contrastive.KIND)}
