"""ipu-sparse: 80%-sparse language models that run from on-chip memory.

Nothing here imports poptorch; the IPU path lives in ``ipu_sparse.ipu`` and imports
it lazily.
"""
from .config import PRESETS, ModelConfig, get_preset
from .errors import UserError
from .model import Transformer, build_model

__version__ = "0.1.0"

__all__ = ["ModelConfig", "PRESETS", "get_preset", "Transformer", "build_model", "UserError", "__version__"]
