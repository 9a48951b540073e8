"""Offline preference optimisation of a policy: DPO (and its loss types), ORPO, SimPO or KTO.

    python align/train_offline.py --config_path configs/align/dpo.yaml [--set align.method=orpo ...]
        [--resume auto|PATH] [--print_config] [--compile] [--device cpu|cuda|mps] [--merge_and_save]
    torchrun --nproc_per_node=N align/train_offline.py --config_path ...   # DDP (full weights also FSDP2)

Full weights, or LoRA / QLoRA with a `lora:` / `qlora:` section. The stage itself is `align.stage`;
the losses are `align.losses`.
"""
from __future__ import annotations

from align.stage import main
from utils.errors import cli_main

if __name__ == "__main__":
    cli_main(lambda: main(False, "Offline preference optimisation (DPO, ORPO, SimPO, KTO) on preference pairs."))
