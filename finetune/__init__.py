"""Supervised fine-tuning on chat data: full-parameter (`sft_train.py`), LoRA and QLoRA
(`peft/`), all one stage (`sft`) on the one training engine.

- `config`: the SFT config sections and how the base model's config merges with ``model:``.
- `base_model`: the base (our checkpoint or a Hugging Face directory), built for each method.
- `sft`: data + loss + parameters handed to `trainer.engine.Trainer`; the shared CLI.
- `peft.adapters`: adapter training, 8-bit optimizers and adapter checkpoints.
"""
