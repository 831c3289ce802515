"""Data-parallel micro-batch sampler that resumes exactly from a consumed-samples count.

Why by hand: megatron-core ships the datasets but not Megatron-LM's training samplers, and
``torch.utils.data.DistributedSampler`` strides samples over ranks (rank r takes r, r+W,
...), which makes the global order depend on the world size.

Layout (as Megatron-LM's pretraining sampler): the dataset's sample order (already shuffled
by ``GPTDataset``) is the *global* order. Each step consumes ``micro_batch_size * dp_size``
consecutive samples; rank r takes the r-th block of ``micro_batch_size``. A global batch is
``global_batch_size / (micro_batch_size * dp_size)`` such steps, i.e. always samples
``[k*G, (k+1)*G)`` of the global order whatever the DP size. Resuming at ``consumed_samples``
just starts the stream there, so a run resumed at N (with any DP size dividing the batch)
sees exactly the batches an uninterrupted run sees from N on.
"""

from __future__ import annotations

from typing import Iterator

from megamoe.errors import UserError


class ResumableBatchSampler:
    """Yields this rank's list of sample indices per micro-batch, from ``consumed_samples``."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 global_batch_size: int, dp_rank: int = 0, dp_size: int = 1):
        step = micro_batch_size * dp_size
        if micro_batch_size <= 0 or dp_size <= 0 or not 0 <= dp_rank < dp_size:
            raise UserError(f"invalid sampler layout: micro_batch_size={micro_batch_size}, "
                            f"dp_rank={dp_rank}, dp_size={dp_size}")
        if global_batch_size % step:
            raise UserError(f"train.global_batch_size={global_batch_size} must be a multiple of "
                            f"train.micro_batch_size x data-parallel size = {micro_batch_size} x "
                            f"{dp_size} = {step}")
        if consumed_samples % step or consumed_samples < 0:
            raise UserError(f"consumed_samples={consumed_samples} is not a multiple of "
                            f"micro_batch_size x data-parallel size = {step}; resume from a "
                            "checkpoint taken at a global-batch boundary")
        self.total, self.consumed, self.mbs, self.step = total_samples, consumed_samples, micro_batch_size, step
        self.offset = dp_rank * micro_batch_size

    def __len__(self) -> int:
        return max(0, (self.total - self.consumed) // self.step)

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(self.consumed, self.consumed + len(self) * self.step, self.step):
            first = start + self.offset
            yield list(range(first, first + self.mbs))
