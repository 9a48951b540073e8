"""The one training engine every stage uses.

- `engine`: the `Trainer` loop (gradient accumulation, AMP, compile, clipping, logging,
  evaluation, saving); a stage hands it data, a loss function and which parameters train.
- `losses`: pure loss functions and the normalisation by the global target-token count.
- `spike_guard`: skip bad updates, roll back after a run of them.
- `checkpointing`: resumable checkpoints (model, optimizer, RNG, data position, ...).
- `evaluation`: validation loss / perplexity and sample generations.
- `metrics`: tokens/s, MFU, memory; metrics.jsonl, TensorBoard, W&B.
- `launch`: process group, seeds, run directory and logging around a stage.
- `optim`, `schedule`: AdamW / Muon and the learning-rate schedules.
- `distributed`: DDP / FSDP2 wrapping, collectives, full state dicts.
"""
