"""LoRA supervised fine-tuning (Hu et al. 2021): low-rank adapters train, the base stays frozen.

    python finetune/peft/lora/sft_lora_train.py --config_path configs/sft/lora.yaml [--merge_and_save]
        [--set lora.r=16 ...] [--resume auto|PATH] [--print_config] [--compile] [--device ...]

Targets (``lora.target_modules``: ``auto``, a list of module names, or ``lora.target_regex``),
rank and scaling are in the ``lora:`` section (`finetune.config`). Every checkpoint also holds
the adapters alone (PEFT layout); ``checkpoints/final`` is the adapters, plus merged plain
weights with ``--merge_and_save``. The stage itself is `finetune.sft`.
"""
from __future__ import annotations

from finetune.sft import main
from utils.errors import cli_main

if __name__ == "__main__":
    cli_main(lambda: main("lora", "LoRA supervised fine-tuning on chat data (frozen base, trained adapters)."))
