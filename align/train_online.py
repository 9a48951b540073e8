"""Online RL: PPO, GRPO, GSPO or rejection-sampling fine-tuning, rollouts through the paged engine.

    python align/train_online.py --config_path configs/align/grpo.yaml   # rl.algorithm: grpo | gspo | ppo | rft
        [--set key=value ...] [--resume auto|PATH] [--print_config] [--compile] [--device ...] [--merge_and_save]
    torchrun --nproc_per_node=N align/train_online.py --config_path ...  # DDP: prompts sharded, groups per rank

The stage itself is `align.rl_stage`; the rollouts `align.rollout`; the losses `align.rl_losses`.
"""
from __future__ import annotations

from align.rl_stage import main
from utils.errors import cli_main

if __name__ == "__main__":
    cli_main(main)
