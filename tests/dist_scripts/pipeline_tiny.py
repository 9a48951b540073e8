"""Pipeline parallelism under torchrun (gloo) against one process, for tests/test_pipeline.py.

    python -m torch.distributed.run --nproc_per_node=2 tests/dist_scripts/pipeline_tiny.py OUT.json

Per case (preset x schedule) every rank builds the same model and the same step of
``grad_accum_steps`` micro-batches; the reference is one process's summed cross-entropy over
the step divided by its target count, and its gradients. The pipelined run is
`trainer.pipeline.Pipeline` on the rank's stages. Rank 0 writes the largest absolute
differences of the loss and of every parameter's gradient, and the merged (`gather_full_state`)
weights after one SGD step must equal the reference model's.
"""
from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from model import build_model, get_preset
from trainer.distributed import destroy_distributed, init_distributed, init_parallel
from trainer.losses import cross_entropy_sum
from trainer.pipeline import Pipeline, gather_full_state
from utils.config import TrainingConfig

CASES = [  # (preset, model overrides, schedule, layers per stage)
    ("tiny-llama3", {}, "gpipe", None),
    ("tiny-llama3", {}, "1f1b", None),
    ("tiny-llama3", {"n_layers": 4}, "interleaved_1f1b", None),
    ("tiny-deepseek_v3", {"mtp_depth": 0}, "gpipe", [2, 1]),
    ("tiny-deepseek_v3", {"mtp_depth": 0}, "1f1b", [2, 1]),
]


def case(preset: str, overrides: dict, schedule: str, split, info) -> dict[str, float]:
    cfg = get_preset(preset, **overrides)
    tcfg = TrainingConfig(pipeline_parallel=2, pipeline_schedule=schedule, pipeline_split=split, grad_accum_steps=4)
    gen = torch.Generator().manual_seed(7)
    micro = []
    for _ in range(tcfg.grad_accum_steps):
        rows = torch.randint(0, cfg.vocab_size, (2, 17), generator=gen)
        labels = rows[:, 1:].clone()
        labels[0, :5] = -100  # masked targets, as in SFT
        micro.append({"input_ids": rows[:, :-1], "labels": labels})
    targets = sum(int((m["labels"] != -100).sum()) for m in micro)

    torch.manual_seed(0)
    ref = build_model(cfg)
    loss = sum(cross_entropy_sum(ref(m["input_ids"]), m["labels"])[0] for m in micro) / targets
    loss.backward()

    torch.manual_seed(0)
    model = build_model(cfg)
    pipe = Pipeline(model, tcfg, info)
    loss_sum = torch.tensor([pipe.step(micro, targets)], dtype=torch.float64)
    dist.all_reduce(loss_sum)  # the last stage's, 0 elsewhere
    ref_grads = dict(ref.named_parameters())
    names = [n for n, _ in pipe.module.named_parameters()]
    worst = max((p.grad - ref_grads[n].grad).abs().max().item() for n, p in pipe.module.named_parameters())
    missing = [n for n, p in pipe.module.named_parameters() if p.grad is None]

    with torch.no_grad():  # one SGD step on both, then the merged weights must be the reference's
        for p in list(ref.parameters()) + list(pipe.module.parameters()):
            p -= 0.1 * p.grad
    merged = gather_full_state({k: v.detach().clone() for k, v in pipe.module.state_dict().items()}, info.group("pp"))
    ref_state = ref.state_dict()  # the merged state is on rank 0 only
    weights = max((merged[k] - ref_state[k]).abs().max().item() for k in ref_state) if info.is_main else 0.0
    counts = [0] * dist.get_world_size()
    dist.all_gather_object(counts, len(names))
    stats = torch.tensor([abs(loss_sum.item() / targets - loss.item()), worst, float(len(missing))],
                         dtype=torch.float64)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    return {"loss": stats[0].item(), "grads": stats[1].item(), "missing_grads": int(stats[2].item()),
            "weights_after_step": weights, "params_per_rank": counts, "params_total": len(ref_grads),
            "keys_merged": sorted(merged) == sorted(ref_state)}


def main() -> None:
    info = init_parallel(init_distributed("cpu"), TrainingConfig(pipeline_parallel=2, grad_accum_steps=2))
    torch.set_num_threads(1)
    results = {f"{preset}/{schedule}": case(preset, overrides, schedule, split, info)
               for preset, overrides, schedule, split in CASES}
    if info.is_main:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f)
    destroy_distributed()


if __name__ == "__main__":
    main()
