"""Ring attention under torchrun (gloo) against single-process attention, for
tests/test_context_parallel.py.

    python -m torch.distributed.run --nproc_per_node=N tests/dist_scripts/ring_attention.py OUT.json

Every rank builds the same attention layer (GQA of ``tiny``, sliding-window GQA of
``tiny-mistral``, MLA of ``tiny-deepseek_v3``) and the same input; the reference is the whole
sequence through the plain layer, the test the rank's zig-zag share through the layer with
the ring hook. Rank 0 writes the largest absolute differences of the outputs, the input
gradients and the parameter gradients (summed over ranks), per case.
"""
from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from model import get_preset
from model.attention import Attention
from model.mla import MLA
from model.positions import RotaryEmbedding, positions_from_doc_ids
from trainer.context_parallel import RingAttention, zigzag_slots
from trainer.distributed import destroy_distributed, init_distributed

LAYERS = {"gqa": ("tiny", Attention), "gqa_window": ("tiny-mistral", Attention), "mla": ("tiny-deepseek_v3", MLA)}


def case(name: str, doc_masked: bool, cp: int, rank: int) -> dict[str, float]:
    preset, cls = LAYERS[name]
    cfg = get_preset(preset, sliding_window=6) if name == "gqa_window" else get_preset(preset)
    torch.manual_seed(0)
    layer = cls(cfg, layer_idx=0)
    batch, seq_len = 2, 8 * cp
    x = torch.randn(batch, seq_len, cfg.dim)
    weight = torch.randn(batch, seq_len, cfg.dim)  # loss = sum(out * weight)
    doc_ids = None
    if doc_masked:  # uneven documents, boundaries inside shards and across them
        doc_ids = torch.cumsum(torch.rand(batch, seq_len) < 0.2, dim=1)
    positions = positions_from_doc_ids(doc_ids) if doc_ids is not None else torch.arange(seq_len).expand(batch, -1)
    rot_dim = cfg.qk_rope_head_dim if cfg.attention_type == "mla" else cfg.attn_head_dim
    rope = RotaryEmbedding(rot_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_seq_len)

    def run(x_in: torch.Tensor, pos: torch.Tensor, docs, w: torch.Tensor):
        layer.zero_grad()
        x_in = x_in.clone().requires_grad_(True)
        out = layer(x_in, rope(pos, torch.float32), pos, None, docs)
        (out * w).sum().backward()
        return out.detach(), x_in.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}

    ref_out, ref_dx, ref_grads = run(x, positions, doc_ids, weight)

    slots = zigzag_slots(seq_len, cp, rank)
    layer.context_parallel = RingAttention(dist.group.WORLD)
    local = [t.index_select(1, slots) if t is not None else None for t in (x, positions, doc_ids, weight)]
    out, dx, grads = run(*local)
    layer.context_parallel = None
    diffs = {"out": (out - ref_out[:, slots]).abs().max().item(), "dx": (dx - ref_dx[:, slots]).abs().max().item()}
    worst = 0.0
    for n, g in grads.items():
        dist.all_reduce(g)  # each rank's share of the parameter gradient
        worst = max(worst, (g - ref_grads[n]).abs().max().item())
    diffs["dparams"] = worst
    gathered = torch.tensor([diffs["out"], diffs["dx"], diffs["dparams"]], dtype=torch.float64)
    dist.all_reduce(gathered, op=dist.ReduceOp.MAX)
    return dict(zip(("out", "dx", "dparams"), gathered.tolist()))


def main() -> None:
    info = init_distributed("cpu")
    torch.set_num_threads(1)
    results = {f"{name}/{'doc' if doc else 'causal'}": case(name, doc, info.world_size, info.rank)
               for name in LAYERS for doc in (False, True)}
    if info.is_main:
        with open(sys.argv[1], "w") as f:
            json.dump({"world_size": info.world_size, "results": results}, f)
    destroy_distributed()


if __name__ == "__main__":
    main()
