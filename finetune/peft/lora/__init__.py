"""LoRA SFT: `sft_lora_train.py`."""
