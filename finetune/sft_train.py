"""Full-parameter supervised fine-tuning: every weight of the base model trains on the SFT bins.

    python finetune/sft_train.py --config_path configs/sft/full.yaml [--set key=value ...]
        [--resume auto|PATH] [--print_config] [--compile] [--device cpu|cuda|mps]
    torchrun --nproc_per_node=N finetune/sft_train.py --config_path ...   # DDP or FSDP2

The stage itself (data, loss, base model, outputs) is `finetune.sft`.
"""
from __future__ import annotations

from finetune.sft import main
from utils.errors import cli_main

if __name__ == "__main__":
    cli_main(lambda: main("full", "Full-parameter supervised fine-tuning on chat data (loss on assistant tokens)."))
