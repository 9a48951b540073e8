"""The generation engine: paged KV cache, continuous batching, sampling.

Split after vLLM (Kwon et al., 2023, "Efficient Memory Management for Large Language Model
Serving with PagedAttention") and its small re-implementation nano-vllm:

- `sequence`      one request: its tokens, status, block table (no torch)
- `block_manager` fixed-size KV blocks, reference counts, prefix caching (no torch)
- `scheduler`     continuous batching, preemption, finishing rules (no torch)
- `sampling`      `SamplingParams` and the batched sampler (torch)

This package file imports nothing, so the bookkeeping modules stay importable without torch.
"""
