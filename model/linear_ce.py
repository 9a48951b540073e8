"""Fused LM head + cross-entropy: the summed next-token loss without the (N, V) logits.

The usual training loss materialises ``logits = h W^T`` (N, V) in fp32, its log-softmax, and in
the backward a zero-filled (N, V) gradient and another for the logits: four tensors of N x V
floats (N = 2,048 tokens x V = 4,096 is 32 MiB each; at DeepSeek-V3's V = 129,280 one 4k-token
row is 2 GiB each). Liger Kernel's fused linear cross-entropy (Hsu et al. 2024) and Apple's Cut
Cross-Entropy (Wijmans et al. 2024) instead walk the rows in chunks and never keep more than one
chunk of logits. The gradient of the summed loss with respect to a chunk's logits is known in
the forward, ``softmax(z) - onehot(target)``, so each chunk is done at once:

    z    = h_c W^T                        (c, V)   [tanh soft-capped when configured]
    loss += sum(logsumexp(z) - z[target])
    g    = softmax(z) - onehot(target)    (c, V)   [times 1 - tanh^2 under the soft cap]
    dh_c = g W                            (c, D)
    dW  += g^T h_c                        (V, D)

and the backward only scales the stored ``dh`` and ``dW`` by the incoming gradient. The same
three matmuls as the unfused head, but only one chunk-sized buffer instead of (N, V) ones:
on 2 CPU cores the DeepSeek-V3 benchmark config's head + loss step takes ~45 instead of ~115 ms.

Under autocast the matmuls run in the autocast dtype (like ``F.linear``) and the softmax in fp32.
"""
from __future__ import annotations

from typing import Optional

import torch

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 19  # logits per chunk: 2 MiB in fp32, cache-sized (128 rows at V = 4,096: measured best)
MIN_CHUNK_ROWS = 64  # keeps the matmuls matrix-shaped at large vocabularies


def chunk_rows(vocab_size: int) -> int:
    """Rows per chunk: one chunk of fp32 logits holds ~`CHUNK_ELEMENTS` values, at least `MIN_CHUNK_ROWS` rows."""
    return max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // vocab_size)


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``h @ weight.T`` against ``targets`` (all valid); see module docstring."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: Optional[float],
                compute_dtype: torch.dtype, want_h: bool, want_w: bool) -> torch.Tensor:
        # h (N, D), weight (V, D), targets (N,) in [0, V)
        n_rows = h.shape[0]
        hc, wc = h.to(compute_dtype), weight.to(compute_dtype)
        grad_h = torch.empty_like(hc) if want_h else None  # (N, D)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None  # (V, D)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        step = chunk_rows(weight.shape[0])
        for start in range(0, n_rows, step):
            x = hc[start : start + step]  # (c, D)
            tgt = targets[start : start + step].unsqueeze(1)  # (c, 1)
            z = (x @ wc.t()).float()  # (c, V)
            capped = None
            if softcap is not None:
                capped = torch.tanh(z / softcap)  # (c, V)
                z = capped * softcap
            picked = z.gather(1, tgt)  # (c, 1) target logits
            peak = z.amax(dim=-1, keepdim=True)  # (c, 1)
            e = z.sub_(peak).exp_()  # (c, V) exp(z - max), in place of the logits
            denom = e.sum(dim=-1, keepdim=True)  # (c, 1)
            total += (peak + denom.log() - picked).sum()  # logsumexp - target logit
            if grad_h is None and grad_w is None:
                continue
            g = e.div_(denom)  # (c, V) softmax
            g.scatter_add_(1, tgt, torch.full_like(tgt, -1.0, dtype=g.dtype))  # - onehot(target)
            if capped is not None:
                g.mul_(1.0 - capped * capped)  # d(c tanh(u / c)) / du
            g = g.to(compute_dtype)
            if grad_h is not None:
                torch.mm(g, wc, out=grad_h[start : start + step])  # (c, D)
            if grad_w is not None:
                if compute_dtype == torch.float32:
                    grad_w.addmm_(g.t(), x)  # (V, D)
                else:
                    grad_w += (g.t() @ x).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        dh = None if grad_h is None else (grad_h * grad_out.to(grad_h.dtype)).to(h_dtype)
        dw = None if grad_w is None else (grad_w * grad_out).to(w_dtype)
        return dh, dw, None, None, None, None, None


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    softcap: Optional[float] = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """sum over targets != ignore_index of -log softmax(cap(h @ weight.T))[target], in fp32.

    h (..., D) normalised hidden states, weight (V, D) the LM head, targets (...) token ids.
    Equal to ``F.cross_entropy(head(h), targets, reduction="sum")`` (``cap`` = the Gemma 2
    soft cap ``c tanh(z / c)`` when ``softcap`` is set) with its gradients, without the logits.
    """
    flat_h = h.reshape(-1, h.shape[-1])  # (N, D)
    flat_t = targets.reshape(-1)  # (N,)
    valid = flat_t != ignore_index
    if not bool(valid.all()):  # only the scored rows go through the head
        flat_h, flat_t = flat_h[valid], flat_t[valid]
    device_type = h.device.type
    compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h.dtype
    grad = torch.is_grad_enabled()
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(flat_h, weight, flat_t, softcap, compute_dtype,
                                         grad and flat_h.requires_grad, grad and weight.requires_grad)
