"""Torch-free Score-CAM on ONNX Runtime: ``Explainer(bundle).explain(image)``.

Never imports torch: numpy, onnx, onnxruntime, Pillow and OpenCV only.
"""

from .contract import BundleError, Preprocessing
from .engine import EngineError
from .explainer import Explainer, Result, TargetError, explain
from .images import ImageError
from .scorecam import PRESETS

__version__ = "0.1.0"

__all__ = ["BundleError", "EngineError", "Explainer", "ImageError", "PRESETS", "Preprocessing", "Result",
           "TargetError", "explain", "__version__"]
