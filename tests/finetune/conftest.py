"""One torch thread: tiny models, 2 shared cores (see tests/hf/conftest.py)."""

import torch

torch.set_num_threads(1)
