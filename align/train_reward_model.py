"""Reward-model training: a scalar head on the policy backbone, Bradley–Terry loss on preference pairs.

    python align/train_reward_model.py --config_path configs/align/reward_model.yaml
        [--set reward.margin=0.5 ...] [--resume auto|PATH] [--print_config] [--compile] [--device ...]
    torchrun --nproc_per_node=N align/train_reward_model.py --config_path ...

Logs accuracy and mean margin on the validation pairs. The final checkpoint is marked as a reward
model in config.json; score with `align/score.py`, export with `utils/convert_hf.py --to_hf` (as
`*ForSequenceClassification`). The stage itself is `align.stage`.
"""
from __future__ import annotations

from align.stage import main
from utils.errors import cli_main

if __name__ == "__main__":
    cli_main(lambda: main(True, "Reward-model training (Bradley-Terry pairwise loss) on preference pairs."))
