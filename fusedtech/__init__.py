"""fusedtech: fused kernels for the standard training techniques, as drop-ins for torch.optim and
torch.nn. See ``python -m fusedtech`` for what runs on this machine."""
import os as _os

# A source checkout built in place (`python setup.py build_ext --inplace`) but not installed has no
# fusedtech.triton_kernels package; its Triton kernels are in the top-level triton_kernels/ folder.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "setup.py")) and _os.path.isfile(_os.path.join(_root, "triton_kernels", "__init__.py")):
    __path__.append(_root)  # noqa: F821 - the package's own search path

from ._backend import (BackendUnavailableError, available_backends, use_backend,  # noqa: F401
                       why_unavailable)
from . import nn, ops, optim  # noqa: F401

__version__ = "0.1.0"
