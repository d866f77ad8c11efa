"""lemoe: lifelong editing of causal language models with a Mixture-of-Experts adaptor (LEMoE)."""

__version__ = "0.5.0"

from .config import LEMoEConfig  # noqa: E402
from .data import DataError, EditRecord, read_edits  # noqa: E402
from .editor import EditReport, LifelongEditor  # noqa: E402
from .models import load_model  # noqa: E402
from .persistence import AdapterError  # noqa: E402

__all__ = [
    "AdapterError",
    "DataError",
    "EditRecord",
    "EditReport",
    "LEMoEConfig",
    "LifelongEditor",
    "__version__",
    "load_model",
    "read_edits",
]
