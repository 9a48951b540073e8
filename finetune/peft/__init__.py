"""Parameter-efficient fine-tuning: LoRA and QLoRA scripts (`lora/`, `qlora/`) and what they
add to the SFT stage (`adapters`: trainable adapters, 8-bit optimizers, adapter checkpoints)."""
