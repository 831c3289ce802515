"""Suite-wide: every rank a test starts (tests/distributed.py, the launchers of tests/train) runs
under megamoe.strict's strict-NCCL mode: no host tensor in a collective, the same collectives in
the same order on every rank of a group, a short collective timeout."""

import os

os.environ.setdefault("MEGAMOE_STRICT_NCCL", "1")
