"""QLoRA supervised fine-tuning (Dettmers et al. 2023): LoRA adapters over a frozen 4-bit NF4 base.

    python finetune/peft/qlora/sft_qlora_train.py --config_path configs/sft/qlora.yaml [--merge_and_save]
        [--set qlora.optimizer=paged_adamw8bit ...] [--resume auto|PATH] [--print_config] [--device ...]

The base's linear layers are quantised to NF4 with double quantisation (``qlora:`` section:
backend torch | bnb | auto, block size, what stays unquantised, 8-bit / paged optimizers);
the adapters (``lora:`` section) train in fp32 and compute in the training dtype. Outputs as
for LoRA. The stage itself is `finetune.sft`.
"""
from __future__ import annotations

from finetune.sft import main
from utils.errors import cli_main

if __name__ == "__main__":
    cli_main(lambda: main("qlora", "QLoRA supervised fine-tuning on chat data (NF4 base, trained LoRA adapters)."))
