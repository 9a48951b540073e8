"""DeepSeekMoE: fine-grained routed experts + always-active shared experts.

Follows DeepSeekMoE (Dai et al. 2024) as used in DeepSeek-V3 (Liu et al. 2024, §2.1.2), with
the routing semantics of Hugging Face ``DeepseekV3TopkRouter`` / ``DeepseekV3MoE``:

1. Router logits ``x @ gate.weight.T`` in fp32; scores ``s = sigmoid(logits)`` (V3) or
   ``softmax(logits)`` (V2).
2. Selection uses ``s + e_score_correction_bias``; the bias changes *which* experts are
   chosen, never the gate weights.
3. Group-limited routing: experts are split into ``n_group`` groups; a group scores the sum of
   its top-2 biased scores (sigmoid, V3) or its max (softmax, V2); only the best
   ``topk_group`` groups stay eligible; then top-k over the eligible experts.
4. Gate weights = unbiased scores of the selected experts, divided by their sum (+1e-20)
   when ``norm_topk_prob``, times ``routed_scaling_factor``.
5. Output = sum_k weight_k * expert_k(x) + shared_experts(x).

Auxiliary-loss-free load balancing (V3 §2.1.2): training forwards count the tokens sent to each
expert; after every optimizer step ``update_moe_biases`` all-reduces the counts over the
data-parallel group and moves ``bias += speed * sign(mean_load - load)``. The optional
sequence-wise balance loss (V3 eq. 17-20) is ``seq_aux_loss``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig, MoEConfig
from model.ffn import FeedForward, glu_activation


# ---------------------------------------------------------------------------- routing math
def route_tokens(
    logits: torch.Tensor,
    bias: torch.Tensor,
    top_k: int,
    scoring_func: str = "sigmoid",
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pick ``top_k`` experts per token.

    logits: (N, E) router logits, bias: (E,) selection bias.
    Returns ``weights`` (N, k), ``indices`` (N, k) and the unbiased ``scores`` (N, E).
    """
    if scoring_func == "sigmoid":
        scores = logits.sigmoid()  # (N, E)
    elif scoring_func == "softmax":
        scores = logits.softmax(dim=-1)  # (N, E)
    else:
        raise ValueError(f"scoring_func must be 'sigmoid' or 'softmax', got {scoring_func!r}")
    choice = scores + bias  # (N, E) used only to choose experts
    if n_group > 1:
        n_tokens, n_experts = choice.shape
        grouped = choice.view(n_tokens, n_group, n_experts // n_group)  # (N, G, E/G)
        if scoring_func == "sigmoid":
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)  # (N, G)
        else:
            group_scores = grouped.amax(dim=-1)  # (N, G)
        group_idx = group_scores.topk(topk_group, dim=-1, sorted=False).indices  # (N, topk_group)
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
        expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(n_tokens, n_experts)
        choice = choice.masked_fill(~expert_mask, float("-inf"))
    indices = choice.topk(top_k, dim=-1, sorted=False).indices  # (N, k)
    weights = scores.gather(1, indices)  # (N, k)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, indices, scores


def seq_aux_loss(scores: torch.Tensor, indices: torch.Tensor, alpha: float) -> torch.Tensor:
    """Sequence-wise balance loss, DeepSeek-V3 eq. 17-20, averaged over the batch rows.

    scores: (B, T, E) unbiased router scores; indices: (B, T, k) selected experts.
    L = alpha * sum_i f_i * P_i with f_i = E / (k T) * #{t: i selected at t} and
    P_i = mean_t s_it / sum_j s_jt.
    """
    batch, seq_len, n_experts = scores.shape
    top_k = indices.shape[-1]
    norm_scores = scores / scores.sum(dim=-1, keepdim=True)  # (B, T, E) eq. 19
    counts = torch.zeros(batch, n_experts, device=scores.device, dtype=scores.dtype)
    counts.scatter_add_(1, indices.reshape(batch, -1), torch.ones_like(indices.reshape(batch, -1), dtype=scores.dtype))
    f = counts * n_experts / (top_k * seq_len)  # (B, E) eq. 18
    p = norm_scores.mean(dim=1)  # (B, E) eq. 20
    return alpha * (f * p).sum(dim=-1).mean()


def expert_counts(experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(E,) int64 count of each expert id in ``experts`` (any shape). Unlike ``bincount``, the
    output length does not depend on the data, so torch.compile keeps it in the graph."""
    flat = experts.reshape(-1)
    return torch.zeros(n_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


# ---------------------------------------------------------------------------- modules
class Router(nn.Module):
    """Linear router ``weight`` (E, dim) and the balancing buffer ``e_score_correction_bias`` (E,)."""

    def __init__(self, dim: int, moe: MoEConfig, init_std: float = 0.02):
        super().__init__()
        self.moe = moe
        self.weight = nn.Parameter(torch.empty(moe.n_routed_experts, dim).normal_(0.0, init_std))
        self.register_buffer("e_score_correction_bias", torch.zeros(moe.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # x: (N, dim) → weights (N, k) fp32, indices (N, k), scores (N, E) fp32
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())  # (N, E)
        m = self.moe
        return route_tokens(
            logits, self.e_score_correction_bias.float(), m.num_experts_per_tok, m.scoring_func,
            m.n_group, m.topk_group, m.norm_topk_prob, m.routed_scaling_factor,
        )


class StackedExperts(nn.Module):
    """E bias-free experts stored as 3-D parameters; tokens dispatched by sorting (token, slot) pairs by expert.

    The experts run as one grouped GEMM per projection where torch has the kernel, else one GEMM
    per expert. Subclasses whose experts are not the plain (E, ...) parameters (LoRA, NF4) set
    ``grouped_gemm = False`` and provide `expert_weights` / `expert` for the loop.
    """

    grouped_gemm = True

    def __init__(self, n_experts: int, dim: int, hidden_dim: int, ffn_type: str, init_std: float):
        super().__init__()
        self.n_experts = n_experts
        self.act = glu_activation(ffn_type)
        self.is_glu = ffn_type != "gelu"

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape).normal_(0.0, init_std))

        if self.is_glu:
            self.gate_proj = param(n_experts, hidden_dim, dim)  # (E, H, D)
        self.up_proj = param(n_experts, hidden_dim, dim)  # (E, H, D)
        self.down_proj = param(n_experts, dim, hidden_dim)  # (E, D, H)

    def expert_weights(self) -> list[tuple[torch.Tensor, ...]]:
        """Per-expert (gate?, up, down) matrices. One ``unbind`` per tensor: its backward stacks the
        E gradients once, where E separate ``param[e]`` views would each add a full (E, ...) zero grad."""
        mats = ([self.gate_proj] if self.is_glu else []) + [self.up_proj, self.down_proj]
        return list(zip(*(m.unbind(0) for m in mats)))

    def expert(self, weights: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
        """One expert with matrices ``weights`` = ([gate (H, D),] up (H, D), down (D, H)) on x: (n, D) → (n, D)."""
        *gate, up_w, down_w = weights
        up = F.linear(x, up_w)  # (n, H)
        h = self.act(F.linear(x, gate[0])) * up if self.is_glu else self.act(up)  # (n, H)
        return F.linear(h, down_w)  # (n, D)

    def grouped(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Every expert in one grouped GEMM per projection: xs (n, D) in expert order, ``counts``
        (E,) rows per expert → (n, D). No host sync: the group offsets stay on the device."""
        offs = torch.cumsum(counts, 0).to(torch.int32)  # (E,) end row of each expert's group
        up = _grouped_mm(xs, self.up_proj.transpose(1, 2), offs)  # (n, H)
        h = self.act(_grouped_mm(xs, self.gate_proj.transpose(1, 2), offs)) * up if self.is_glu else self.act(up)
        return _grouped_mm(h, self.down_proj.transpose(1, 2), offs)  # (n, D)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        # x: (N, D), weights/indices: (N, k) → (N, D)
        if self.grouped_gemm and not torch.is_grad_enabled() and indices.numel() <= self.n_experts:
            return self.gathered(x, weights, indices)
        return self.dispatch(x, weights, indices)

    def gathered(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Few tokens (decoding): each (token, slot) pair gathers its expert's matrices and runs
        as one batched matmul per projection. It reads no more weights than the experts hold
        (N*k ≤ E), needs no sort, and every shape is static, so a compiled decode step keeps it
        in its graph. x (N, D), weights/indices (N, k) → (N, D)."""
        n_tokens, top_k = indices.shape
        flat = indices.reshape(-1)  # (N*k,)
        xs = x.unsqueeze(1).expand(n_tokens, top_k, x.shape[-1]).reshape(-1, 1, x.shape[-1])  # (N*k, 1, D)
        up = torch.bmm(xs, self.up_proj[flat].transpose(1, 2))  # (N*k, 1, H)
        h = self.act(torch.bmm(xs, self.gate_proj[flat].transpose(1, 2))) * up if self.is_glu else self.act(up)
        ys = torch.bmm(h, self.down_proj[flat].transpose(1, 2)).view(n_tokens, top_k, -1)  # (N, k, D)
        return (ys * weights.unsqueeze(-1)).sum(dim=1).to(x.dtype)  # fp32 gate weights

    @torch.compiler.disable  # data-dependent group sizes: compiled, every new split would be a new graph
    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Tokens sorted by expert, each expert's rows one group of a grouped GEMM (or one GEMM
        per expert), scattered back weighted. x (N, D), weights/indices (N, k) → (N, D)."""
        top_k = indices.shape[1]
        flat_expert = indices.reshape(-1)  # (N*k,) expert of each (token, slot)
        order = torch.argsort(flat_expert, stable=True)  # slots grouped by expert
        token_of_slot = order // top_k  # (N*k,) source token of each sorted slot
        counts = expert_counts(flat_expert, self.n_experts)  # (E,)
        # index_select, not x[token_of_slot]: its backward is an index_add (~15x faster on CPU
        # than the accumulating index_put that advanced indexing's backward runs)
        xs = x.index_select(0, token_of_slot)  # (N*k, D) tokens in expert order
        if self.grouped_gemm and grouped_mm_supported(xs, self.up_proj):
            ys = self.grouped(xs, counts)
        else:  # one GEMM per expert that received tokens
            outs, start = [], 0
            for mats, n in zip(self.expert_weights(), counts.tolist()):
                if n:
                    outs.append(self.expert(mats, xs[start : start + n]))
                    start += n
            ys = torch.cat(outs)
        ys = ys * weights.reshape(-1).index_select(0, order).unsqueeze(-1)  # (N*k, D), fp32 gate weights
        out = torch.zeros_like(x)  # (N, D)
        return out.index_add_(0, token_of_slot, ys.to(x.dtype))


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x (n, in) @ w[g] (E, in, out) for the rows of group g (ends at ``offs[g]``) → (n, out)."""
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return fn(x, w, offs=offs)


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM runs here: a CPU kernel (any float dtype, 16-byte aligned
    operands) or CUDA sm80+ (bf16); otherwise `StackedExperts` loops over the experts."""
    if not (hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")) or x.dtype != w.dtype:
        return False
    if w.device.type == "cpu":
        return w.data_ptr() % 16 == 0 and x.data_ptr() % 16 == 0 and x.dtype in (torch.float32, torch.bfloat16)
    if w.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(w.device) >= (8, 0)
    return False


class MoE(nn.Module):
    """DeepSeekMoE FFN: ``gate`` (router), ``experts`` (stacked), ``shared_experts`` (dense)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.moe is None:
            raise ValueError("MoE needs cfg.moe (a MoEConfig)")
        if cfg.mlp_bias:
            raise ValueError("mlp_bias=true is not supported with moe: routed experts have no biases")
        self.moe = m = cfg.moe
        self.gate = Router(cfg.dim, m, cfg.init_std)
        self.experts = StackedExperts(m.n_routed_experts, cfg.dim, m.moe_ffn_hidden_dim, cfg.ffn_type, cfg.init_std)
        self.shared_experts = (
            FeedForward(cfg.dim, m.moe_ffn_hidden_dim * m.n_shared_experts, cfg.ffn_type)
            if m.n_shared_experts > 0
            else None
        )
        # Per-expert token counts of the training forwards since the last bias update. A plain
        # tensor attribute, not a registered buffer: DDP (broadcast_buffers=True) would overwrite
        # every rank's buffers with rank 0's before each forward, losing the local counts. Made on
        # the CPU even under a meta-device context, and moved to the tokens' device on first use.
        self.tokens_per_expert = torch.zeros(m.n_routed_experts, dtype=torch.int64, device="cpu")
        # Global (all-reduced) counts of the last optimizer step, set by ``update_moe_biases``.
        self.last_tokens_per_expert: Optional[torch.Tensor] = None
        self.aux_loss: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, dim = x.shape
        flat = x.reshape(-1, dim)  # (N, D)
        weights, indices, scores = self.gate(flat)  # (N, k), (N, k), (N, E)
        out = self.experts(flat, weights, indices).view(batch, seq_len, dim)  # (B, T, D)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        self.aux_loss = None
        if self.training:
            with torch.no_grad():
                if self.tokens_per_expert.device != indices.device:
                    self.tokens_per_expert = self.tokens_per_expert.to(indices.device)
                self.tokens_per_expert += expert_counts(indices, self.moe.n_routed_experts)
            if self.moe.seq_aux_loss_alpha > 0:
                self.aux_loss = seq_aux_loss(
                    scores.view(batch, seq_len, -1), indices.view(batch, seq_len, -1), self.moe.seq_aux_loss_alpha
                )
        return out

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """``bias += speed * sign(mean(load) - load)`` from global counts ``load`` (E,); resets the counts."""
        load = load.to(torch.float32)
        bias = self.gate.e_score_correction_bias
        bias += self.moe.bias_update_speed * torch.sign(load.mean() - load).to(bias.device, bias.dtype)
        self.last_tokens_per_expert = load.detach().cpu()
        self.tokens_per_expert.zero_()


# ---------------------------------------------------------------------------- model-level helpers
def moe_modules(model: nn.Module) -> list[tuple[str, MoE]]:
    """Every MoE layer of ``model`` with its qualified name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


@torch.no_grad()
def update_moe_biases(model: nn.Module, group: Optional[dist.ProcessGroup] = None) -> None:
    """Auxiliary-loss-free balancing step; call once after every optimizer step.

    Sums each layer's token counts over the data-parallel ``group`` (when torch.distributed is
    initialised, one all-reduce for all layers), updates every ``e_score_correction_bias``
    and resets the counts. Router weights are never touched.
    """
    layers = [m for _, m in moe_modules(model)]
    if not layers:
        return
    device = layers[0].gate.e_score_correction_bias.device
    counts = torch.cat([m.tokens_per_expert.to(device) for m in layers])  # (L * E,)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    for m, load in zip(layers, counts.split([m.moe.n_routed_experts for m in layers])):
        m.update_bias(load)


def moe_aux_loss(model: nn.Module) -> Optional[torch.Tensor]:
    """Sum of the sequence-wise balance losses of the last forward (None when there are none)."""
    losses = [m.aux_loss for _, m in moe_modules(model) if m.aux_loss is not None]
    return torch.stack(losses).sum() if losses else None


def moe_load_stats(model: nn.Module) -> dict[str, float | list[float]]:
    """Expert-load statistics of the LAST optimizer step (the global counts that
    ``update_moe_biases`` consumed), for logging. Empty until the first update.

    Keys per layer: ``moe/<name>/load`` (fraction of routed slots per expert),
    ``moe/<name>/max_min_ratio`` (inf when an expert got nothing), ``moe/<name>/cv``
    (std / mean of the counts); plus ``moe/max_min_ratio`` (worst layer) and ``moe/cv`` (mean).
    """
    stats: dict[str, float | list[float]] = {}
    ratios, cvs = [], []
    for name, m in moe_modules(model):
        load = m.last_tokens_per_expert
        if load is None or load.sum() == 0:
            continue
        ratio = (load.max() / load.min()).item() if load.min() > 0 else float("inf")
        cv = (load.std(correction=0) / load.mean()).item()
        stats[f"moe/{name}/load"] = (load / load.sum()).tolist()
        stats[f"moe/{name}/max_min_ratio"] = ratio
        stats[f"moe/{name}/cv"] = cv
        ratios.append(ratio)
        cvs.append(cv)
    if ratios:
        stats["moe/max_min_ratio"] = max(ratios)
        stats["moe/cv"] = sum(cvs) / len(cvs)
    return stats
