"""depthkit.pseudo_label: teacher inference over image shards -> pseudo-label shards.

    from depthkit.pseudo_label import PseudoLabelConfig, run_pseudo_label
    config = PseudoLabelConfig(inputs=("data/unlabeled",), output="data/pseudo", model="dav2_vitl",
                               weights="depth_anything_v2_vitl.pth", tta="hflip")
    summary = run_pseudo_label(config, devices=8)       # or one rank per process under torchrun / srun

The student reads the output with `ShardStream(images, kind="pseudo", labels="data/pseudo")`. See
`docs/pseudo_labeling.md`; `job` (the pipeline of one rank), `launch` (ranks, spawning), `index` (records, resume,
`index.json`), `teacher` (loading, hashing, the batched forward).

Names are imported lazily (PEP 562), so `depthkit.pseudo_label.commands` (and `depthkit --help`) does not import
torch. This package never imports lightning or `depthkit.train`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from depthkit._lazy import lazy_exports

_EXPORTS = {
    "PseudoLabelConfig": "job",
    "RankSummary": "job",
    "label_shards": "job",
    "decode_confidence": "job",
    "JobSummary": "launch",
    "run_pseudo_label": "launch",
    "resolve_launch": "launch",
    "LabelSettings": "index",
    "read_index": "index",
    "Teacher": "teacher",
    "load_teacher": "teacher",
    "label_batch": "teacher",
    "launch_batch": "teacher",
    "PendingLabels": "teacher",
}
__all__ = [
    "JobSummary",
    "LabelSettings",
    "PendingLabels",
    "PseudoLabelConfig",
    "RankSummary",
    "Teacher",
    "decode_confidence",
    "label_batch",
    "label_shards",
    "launch_batch",
    "load_teacher",
    "read_index",
    "resolve_launch",
    "run_pseudo_label",
]
assert sorted(__all__) == sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from depthkit.pseudo_label.index import LabelSettings, read_index
    from depthkit.pseudo_label.job import PseudoLabelConfig, RankSummary, decode_confidence, label_shards
    from depthkit.pseudo_label.launch import JobSummary, resolve_launch, run_pseudo_label
    from depthkit.pseudo_label.teacher import PendingLabels, Teacher, label_batch, launch_batch, load_teacher


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
