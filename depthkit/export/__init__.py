"""depthkit.export: ONNX export with dynamic resolution, verification against PyTorch, ONNX Runtime inference.

    from depthkit.export import export_onnx, OnnxDepthModel
    export_onnx(create_model("dav2_vits", pretrained=True), "dav2_vits.onnx")   # checked, verified, atomic
    model = OnnxDepthModel("dav2_vits.onnx")                                      # no torch needed from here on
    pred = model.infer(image_uint8_HWC)

Modules: `exporter` (the graph, export, loading a model to export), `verification` (ONNX Runtime vs PyTorch),
`runtime` (numpy + PIL + onnxruntime only: `OnnxDepthModel`), `metadata` (the graph's `metadata_props`, stdlib
only), `commands` (`depthkit export onnx`). See docs/export.md.

The names below are imported lazily (PEP 562), so importing `depthkit.export.runtime` or `depthkit.export.commands`
does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from depthkit._lazy import lazy_exports

_EXPORTS = {
    "export_onnx": "exporter",
    "load_model": "exporter",
    "ExportResult": "exporter",
    "verify_onnx": "verification",
    "VerificationError": "verification",
    "VerifyReport": "verification",
    "TOLERANCES": "verification",
    "OnnxDepthModel": "runtime",
    "Prediction": "runtime",
    "GraphMeta": "metadata",
}
__all__ = [
    "TOLERANCES",
    "ExportResult",
    "GraphMeta",
    "OnnxDepthModel",
    "Prediction",
    "VerificationError",
    "VerifyReport",
    "export_onnx",
    "load_model",
    "verify_onnx",
]
assert sorted(__all__) == sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from depthkit.export.exporter import ExportResult, export_onnx, load_model
    from depthkit.export.metadata import GraphMeta
    from depthkit.export.runtime import OnnxDepthModel, Prediction
    from depthkit.export.verification import TOLERANCES, VerificationError, VerifyReport, verify_onnx


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
