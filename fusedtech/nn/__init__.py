"""Drop-in modules for ``torch.nn`` (fused norms and dropout land here as they are built)."""
from . import functional, utils  # noqa: F401
