"""QLoRA SFT: `sft_qlora_train.py`."""
