"""Explaining object detectors deployed as ONNX: Score-CAM for one box with the D-RISE similarity.

``DetectionExplainer(model).explain(image, detection=0)`` -> one :class:`BoxResult` per box. Built on the
classifier's engine (:class:`runtime.engine.Engine`: one main session gives the detections and the feature
maps, the same session scores the masked images chunk by chunk) and Score-CAM's masks and presets; see
``docs/detection.md``.
"""

from .explainer import BoxResult, Detection, DetectionExplainer
from .heads import Head, Target
from .model import Detector, Level, looks_like_detector, open_detector

__all__ = ["BoxResult", "Detection", "DetectionExplainer", "Detector", "Head", "Level", "Target",
           "looks_like_detector", "open_detector"]
