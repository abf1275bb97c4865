"""onnx-excite: Excitation Backprop attention maps for ONNX image classifiers.

Build a companion ONNX model (forward graph + excitation branch) with
:func:`build_excitation_model`, or build and run it with :class:`Exciter`.
"""
from .graph.builder import SIGNAL, ExcitationModel, build_excitation_model
from .methods import METHODS
from .errors import ExciteError, UnsupportedModelError
from .run.runtime import Exciter, Explanation, signal_matrix

__version__ = "0.1.0"

__all__ = [
    "METHODS", "SIGNAL", "ExcitationModel", "build_excitation_model", "ExciteError",
    "UnsupportedModelError", "Exciter", "Explanation", "signal_matrix", "__version__",
]

# A source checkout keeps the CLI and the model recipes in the top-level cli/ and models/
# folders; a wheel installs them inside the package. Importing from a checkout (its root on
# sys.path, as in `python -m pytest` there) finds them through this path entry.
import os as _os

_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "cli")) and _os.path.isfile(_os.path.join(_root, "cli", "__init__.py")):
    __path__.append(_root)
del _os, _root
