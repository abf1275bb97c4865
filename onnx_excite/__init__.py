"""onnx-excite: Excitation Backprop attention maps for ONNX image classifiers.

Build a companion ONNX model (forward graph + excitation branch) with
:func:`build_excitation_model`, or build and run it with :class:`Exciter`.
"""
from .builder import SIGNAL, ExcitationModel, build_excitation_model
from .methods import METHODS
from .errors import ExciteError, UnsupportedModelError
from .runtime import Exciter, Explanation, signal_matrix

__version__ = "0.1.0"

__all__ = [
    "METHODS", "SIGNAL", "ExcitationModel", "build_excitation_model", "ExciteError",
    "UnsupportedModelError", "Exciter", "Explanation", "signal_matrix", "__version__",
]
