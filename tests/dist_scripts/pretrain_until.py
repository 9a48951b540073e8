"""`pretrain.train(cfg, stop_at=N)` from the command line, for tests that stop a torchrun run
midway and resume it with ``pretrain/train.py --resume auto``.

    python -m torch.distributed.run --nproc_per_node=2 tests/dist_scripts/pretrain_until.py CONFIG.yaml N
"""
from __future__ import annotations

import sys

import pretrain.train as pretrain
from utils.config import ExperimentConfig, load_config

if __name__ == "__main__":
    config_path, stop_at = sys.argv[1], int(sys.argv[2])
    pretrain.train(load_config(config_path, ExperimentConfig), stop_at=stop_at)
