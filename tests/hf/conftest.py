"""One torch thread for the HF tests: the models are tiny, and with other processes on the
same 2 cores multi-threaded tiny matmuls were measured ~80x slower (thread contention)."""

import torch

torch.set_num_threads(1)
