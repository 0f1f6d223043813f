"""The chunked LM-head loss against F.cross_entropy of the full logits, in float64: loss and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aic_core.model.nn.loss import chunk_rows, lm_head_loss
from aic_core.model.nn.transformer import Transformer, TransformerConfig
from aic_plugins.positional.learned import LearnedPositions

VOCAB, PADDED, WIDTH = 1000, 1024, 24  # the head has 24 rows of vocabulary padding, as Transformer pads it


def reference(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab: int = VOCAB) -> torch.Tensor:
    """What Transformer.forward computed before: full logits, padding sliced off, then cross-entropy."""
    logits = F.linear(x, weight)[..., :vocab]
    return F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1), ignore_index=-1)


def inputs(B: int = 3, T: int = 37, seed: int = 0, ignored: float = 0.2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, WIDTH, dtype=torch.float64, generator=g)
    weight = torch.randn(PADDED, WIDTH, dtype=torch.float64, generator=g) * 0.5
    weight[VOCAB:] = 0  # padding rows are zero in a real model; their gradient must stay zero
    targets = torch.randint(0, VOCAB, (B, T), generator=g)
    targets[torch.rand(B, T, generator=g) < ignored] = -1
    return x, weight, targets


def loss_and_grads(fn, x, weight, targets, **kwargs):
    x, weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fn(x, weight, targets, **kwargs)
    loss.backward()
    return loss.detach(), x.grad, weight.grad


@pytest.mark.parametrize("rows", [1, 7, 16, 111, 4096], ids=lambda r: f"rows{r}")
def test_loss_and_gradients_equal_cross_entropy_in_float64(rows):
    """Chunks that divide the 111 rows, that do not (7, 16), one row each, and one chunk for all of them."""
    x, weight, targets = inputs()
    want = loss_and_grads(reference, x, weight, targets)
    got = loss_and_grads(lambda *a: lm_head_loss(*a, VOCAB, rows=rows), x, weight, targets)
    for g, w in zip(got, want):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)
    assert torch.count_nonzero(got[2][VOCAB:]) == 0  # the padding rows of the head learn nothing


def test_ignored_targets_add_nothing_and_their_rows_get_no_gradient():
    x, weight, targets = inputs(ignored=0.5)
    loss, grad_x, _ = loss_and_grads(lambda *a: lm_head_loss(*a, VOCAB, rows=8), x, weight, targets)
    kept = targets != -1
    # The mean over counted rows only: the same as cross-entropy over those rows alone.
    torch.testing.assert_close(loss, reference(x[kept], weight, targets[kept]), rtol=1e-12, atol=0)
    assert torch.count_nonzero(grad_x[~kept]) == 0 and torch.count_nonzero(grad_x[kept]) > 0


def test_backward_scales_with_the_upstream_gradient():
    """Gradient accumulation divides the loss before backward; the gradients kept from the forward must follow."""
    x, weight, targets = inputs()
    want = loss_and_grads(lambda *a: reference(*a) * 0.25, x, weight, targets)
    got = loss_and_grads(lambda *a: lm_head_loss(*a, VOCAB, rows=10) * 0.25, x, weight, targets)
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-15)


def test_frozen_head_or_frozen_input_gets_no_gradient_and_the_other_is_right():
    x, weight, targets = inputs()
    want = loss_and_grads(reference, x, weight, targets)
    frozen_head = weight.clone()  # e.g. LoRA: the embedding (the tied head) does not train
    xg = x.clone().requires_grad_()
    lm_head_loss(xg, frozen_head, targets, VOCAB, rows=9).backward()
    torch.testing.assert_close(xg.grad, want[1], rtol=1e-12, atol=1e-14)
    assert frozen_head.grad is None
    wg = weight.clone().requires_grad_()
    lm_head_loss(x, wg, targets, VOCAB, rows=9).backward()
    torch.testing.assert_close(wg.grad, want[2], rtol=1e-12, atol=1e-14)


def test_without_gradients_only_the_loss():
    x, weight, targets = inputs()
    with torch.no_grad():
        loss = lm_head_loss(x, weight.requires_grad_(), targets, VOCAB, rows=5)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, reference(x, weight.detach(), targets), rtol=1e-12, atol=0)


def model(tie: bool) -> Transformer:
    torch.manual_seed(0)
    c = TransformerConfig(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=4, n_embd=WIDTH, tie_embeddings=tie)
    m = Transformer(c, LearnedPositions(c.block_size, c.n_embd)).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for weight in (m.wte.weight, None if m.lm_head is None else m.lm_head.weight):
            if weight is not None:
                weight[VOCAB:] = 0
    return m


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_transformer_gradients_equal_the_full_logits_cross_entropy(tie):
    """Every parameter's gradient, through the whole model: with tied embeddings the head's gradient adds to the
    embedding's (one tensor, two uses); untied, each has its own."""
    m = model(tie)
    idx = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(2))
    targets[:, :5] = -1
    m(idx, targets).backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    reference_loss = F.cross_entropy(m(idx).reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-1)
    reference_loss.backward()
    for name, p in m.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-10, atol=1e-13, msg=name)
    head = m.wte.weight if tie else m.lm_head.weight
    assert torch.count_nonzero(got["wte.weight" if tie else "lm_head.weight"][VOCAB:]) == 0 and head.shape[0] == PADDED


def test_bf16_autocast_stays_within_bf16_rounding_of_float64():
    """Under autocast the matmuls run in bf16 (as F.linear would) and the softmax in fp32."""
    x, weight, targets = inputs()
    want = loss_and_grads(reference, x, weight, targets)
    xf, wf = x.float(), weight.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss_and_grads(lambda *a: lm_head_loss(*a, VOCAB, rows=16), xf, wf, targets)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    assert abs(got[0].item() - want[0].item()) < 2e-2 * want[0].item()
    for g, w in zip(got[1:], want[1:]):
        assert (g.double() - w).norm() < 2e-2 * w.norm()


def test_chunk_rows_keeps_a_chunk_of_logits_near_its_budget():
    assert chunk_rows(4096, torch.device("cpu")) == 256  # 2^20 logits
    assert chunk_rows(50304, torch.device("cuda")) == 1024  # 2^26 / 50304 = 1334, rounded down to a power of two
    assert chunk_rows(2**22, torch.device("cpu")) == 1


def test_under_torch_compile_the_same_loss_and_gradients():
    """Compiled (dynamo + AOTAutograd, in one graph), the one-hot is a compare instead of a scatter: same numbers."""
    x, weight, targets = inputs()
    want = loss_and_grads(reference, x, weight, targets)
    compiled = torch.compile(lambda *a: lm_head_loss(*a, VOCAB, rows=32), backend="aot_eager", fullgraph=True)
    got = loss_and_grads(compiled, x, weight, targets)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


def test_fp16_gradients_under_a_loss_scale_do_not_underflow():
    """An fp16 model (DeepSpeed's fp16 mode) scales the loss before backward so that small gradients survive fp16;
    the per-token gradients here are summed in fp16 and divided by the token count only in fp32, so they are as
    accurate as the scale allows."""
    x, weight, targets = inputs(B=8, T=128, ignored=0.0)
    want = loss_and_grads(reference, x, weight, targets)
    got = loss_and_grads(lambda *a: lm_head_loss(*a, VOCAB, rows=256) * 65536.0, x.half(), weight.half(), targets)
    assert got[1].dtype == got[2].dtype == torch.float16
    for g, w in zip(got[1:], want[1:]):
        assert (g.double() / 65536 - w).norm() < 5e-3 * w.norm()


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "inductor"])
def test_cuda_bf16_autocast_eager_and_compiled_stay_within_bf16_rounding_of_float64(compiled):
    x, weight, targets = inputs(B=4, T=256)
    want = loss_and_grads(reference, x, weight, targets)
    fn = lambda *a: lm_head_loss(*a, VOCAB, rows=128)  # noqa: E731
    fn = torch.compile(fn, fullgraph=True) if compiled else fn
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = loss_and_grads(fn, x.float().cuda(), weight.float().cuda(), targets.cuda())
    assert abs(got[0].item() - want[0].item()) < 2e-2 * want[0].item()
    for g, w in zip(got[1:], want[1:]):
        assert g.dtype == torch.float32 and (g.double().cpu() - w).norm() < 2e-2 * w.norm()
    assert torch.count_nonzero(got[2][VOCAB:]) == 0
