"""Run by tests/test_distributed.py under ``torchrun --nproc-per-node 2`` (gloo): the library's
collective measurements (pickled per rank), then ``lcpaq analyze`` through the CLI in the same
processes, so the test pays for starting two Python processes once.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/sensitivity/distributed_worker.py \\
        OUT_DIR [lcpaq CLI arguments]
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import torch
from test_distributed import measure_all

from lcpaq.cli import main
from lcpaq.sensitivity.distributed import init_from_environment, is_main_process, rank_and_world

if __name__ == "__main__":
    torch.set_num_threads(1)
    assert init_from_environment("gloo")
    rank, world = rank_and_world()
    assert world == 2 and is_main_process() == (rank == 0)
    Path(sys.argv[1], f"rank{rank}.pkl").write_bytes(pickle.dumps(measure_all(share_all=True)))
    sys.exit(main(sys.argv[2:]))
