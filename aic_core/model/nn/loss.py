"""The language-model loss: LM head and cross-entropy together, a chunk of rows at a time.

The logits of a whole batch are the largest tensor of a training step (GPT-2 at 16 x 1024 tokens: 16,384
rows x 50,304 columns, 3.3 GB in fp32), and F.cross_entropy reads and writes them several times (the
log-softmax, its gradient, the slice that drops the vocabulary padding). Here each chunk of rows gets its
logits, its loss and, when training, its gradients in one go: the gradient of the cross-entropy with
respect to the logits is softmax - one-hot, so the chunk's logits become their own gradient in place, which
two matmuls turn into the gradients of the hidden states and of the head weight. The chunk stays in the
CPU's cache (or, on a GPU, a buffer of a few hundred MB), and the backward pass only scales the two
gradients kept from the forward pass (by the upstream gradient and the mean's 1/n). The matmuls are the
three the plain head does; none is recomputed.
"""

from __future__ import annotations

import torch

IGNORE = -1  # targets equal to this are not counted (padding, the rows a batch does not predict)


def lm_head_loss(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int, rows: int | None = None
) -> torch.Tensor:
    """Mean cross-entropy of the logits x @ weight[:vocab_size].T against `targets` (-1 ignored): the value of
    F.cross_entropy(F.linear(x, weight)[..., :vocab_size].float(), targets, ignore_index=-1), in fp32 (or the
    wider dtype of x), with the matmuls in autocast's dtype when autocast is on.

    x (..., C) hidden states; weight (V, C) the head, V >= vocab_size (rows past vocab_size pad the vocabulary
    and are never predicted; they get a zero gradient); targets (...) token ids. `rows`: rows per chunk
    (default: chunk_rows for this vocabulary and device).
    """
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)
    rows = rows or chunk_rows(weight.size(0), x.device)
    with torch.autocast(device, enabled=False):  # the casts are explicit: each chunk matmul in `dtype`
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return _HeadCrossEntropy.apply(x, weight, targets, vocab_size, dtype, rows)
        return _chunked(x, weight, targets, vocab_size, dtype, rows, False, False)[0]


def chunk_rows(vocab: int, device: torch.device) -> int:
    """Rows per chunk, a power of two: about 2^20 logits on the CPU (4 MiB in fp32, so a chunk stays in cache
    between its passes); 2^26 on a GPU (256 MiB in fp32: chunks large enough for full-speed matmuls, few enough
    to keep a compiled graph short)."""
    budget = 2**26 if device.type == "cuda" else 2**20
    return 1 << (max(budget // vocab, 1).bit_length() - 1)


class _HeadCrossEntropy(torch.autograd.Function):
    """The loss, with the gradients of x and weight computed in the forward pass and scaled in the backward."""

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size, dtype, rows):  # noqa: ANN001, ANN205
        loss, grad_x, grad_w, n = _chunked(x, weight, targets, vocab_size, dtype, rows, *ctx.needs_input_grad[:2])
        ctx.save_for_backward(grad_x, grad_w, n)
        ctx.dtypes = x.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        grad_x, grad_w, n = ctx.saved_tensors
        scale = grad / n  # the mean's 1/n, applied here in fp32 (see _chunked)
        grad_x = None if grad_x is None else (grad_x.to(scale.dtype) * scale).to(ctx.dtypes[0])
        grad_w = None if grad_w is None else (grad_w * scale).to(ctx.dtypes[1])
        return grad_x, grad_w, None, None, None, None


def _chunked(x, weight, targets, vocab_size, dtype, rows, need_x, need_w):  # noqa: ANN001, ANN202
    """(mean loss, n d loss / d x or None, n d loss / d weight or None, n), chunk by chunk; n the number of
    counted targets. x (N, C), targets (N,). The gradients are those of the summed loss: the 1/n of the mean
    waits for the backward pass, so that in fp16 the small per-token gradients do not underflow before a loss
    scale multiplies them (the plain path scales first too: autograd passes the scale down before any cast)."""
    acc = torch.promote_types(
        dtype, torch.float32
    )  # softmax and loss: fp32 at least, as F.cross_entropy on .float() logits
    xs, w = x.to(dtype), weight.to(dtype)
    valid = targets != IGNORE
    picks = torch.where(valid, targets, 0)[:, None]  # (N, 1): an ignored row picks column 0, then counts nothing
    n = valid.sum().to(acc)
    total = torch.zeros((), dtype=acc, device=x.device)
    grad_x = torch.empty_like(xs) if need_x else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=x.device) if need_w else None
    for start in range(0, x.size(0), rows):
        end = min(start + rows, x.size(0))
        xc, pick, counted = xs[start:end], picks[start:end], valid[start:end, None].to(acc)
        z = torch.mm(xc, w.t())  # (R, V) logits
        if z.size(1) > vocab_size:
            z[:, vocab_size:] = float("-inf")  # the padding rows of the head are not in the vocabulary
        logp = torch.log_softmax(z, dim=1, dtype=acc)  # one kernel, reading bf16 logits straight into fp32
        total -= (logp.gather(1, pick) * counted).sum()
        if not (need_x or need_w):
            continue
        # d summed loss / d logits: softmax - one-hot for counted rows, 0 for ignored ones.
        g = logp.exp_()  # softmax, in place of the log-probabilities
        if torch.compiler.is_compiling():  # minus the one-hot: a compare that fuses into the softmax's kernel
            g = torch.where(torch.arange(g.size(1), device=g.device) == pick, g - 1, g)
        else:  # eagerly: touch the R target entries only
            g.scatter_add_(1, pick, torch.full_like(counted, -1))
        g = g.mul_(counted).to(dtype)
        if grad_x is not None:
            torch.mm(g, w, out=grad_x[start:end])
        if grad_w is not None:
            if acc == dtype:
                grad_w.addmm_(g.t(), xc)
            else:  # bf16/fp16 matmul, each chunk's share added in fp32
                grad_w += torch.mm(g.t(), xc)
    return total / n, grad_x, grad_w, n
