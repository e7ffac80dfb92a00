"""Drop-in for ``torch.optim``: ``import fusedtech.optim as optim`` works in place of
``import torch.optim as optim``. Fused classes replace torch's; everything else (lr_scheduler,
swa_utils, the optimizers not fused yet) is torch's own."""
from torch.optim import *  # noqa: F401,F403 - the namespace we mirror
from torch.optim import Optimizer, lr_scheduler, swa_utils  # noqa: F401

from .adagrad import Adagrad, FusedAdagrad  # noqa: F401
from .adam import Adam, Adam8bit, AdamFp8, AdamW, AdamW8bit, AdamWFp8, FusedAdam, FusedAdamW  # noqa: F401
from .lamb import LAMB, FusedLAMB, Lamb  # noqa: F401
from .rmsprop import FusedRMSprop, RMSprop  # noqa: F401
from .quantized import dequantize_state_dict  # noqa: F401
from .sgd import SGD, FusedSGD  # noqa: F401

FUSED = ("Adam", "AdamW", "SGD", "RMSprop", "Adagrad", "LAMB")
