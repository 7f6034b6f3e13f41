"""What the real sizes (4096 x 131072 latents, 8192-token batches) need that tiny tests never
see: reductions over [B, F] never widen the whole tensor to 8 bytes per element, "cuda" and
"cuda:0" are one device, BatchTopK's selection is exact without sorting B·F values, and the
transfer CE/KL never hold batch x vocabulary logits three times. Measured with torch's
profiler (largest single CPU allocation), which sees exactly what a CUDA run would allocate."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from sae_transfer.diffing.latent_stats import same_device
from sae_transfer.sae import metrics


def largest_allocation(fn) -> int:
    """Bytes of the largest single CPU allocation `fn` makes."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)


def test_a_default_cuda_device_is_the_current_gpu_not_another_device():
    assert torch.device("cuda", 0) != torch.device("cuda")  # the comparison that deep-copied every SAE
    assert same_device(torch.device("cuda", 0), "cuda") and same_device("cuda", "cuda:0")
    assert not same_device("cuda:1", "cuda") and not same_device("cuda:0", "cuda:1")
    assert same_device("cpu", torch.device("cpu")) and not same_device("cpu", "cuda:0") and not same_device("cuda", "meta")


@pytest.mark.parametrize("dtype", [None, torch.float64])
def test_column_sums_equal_torchs_in_chunks(monkeypatch, dtype):
    monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", 1000)  # 7 rows of 130 at a time
    x = torch.randn(300, 130, generator=torch.Generator().manual_seed(0)).relu()
    if dtype is None:
        assert torch.equal(metrics.column_sum(x > 0), (x > 0).sum(0))
        assert torch.equal(metrics.count_nonzero_columns(x), torch.count_nonzero(x, dim=0))
        assert int(metrics.count_true(x > 0)) == int((x > 0).sum())
    else:
        torch.testing.assert_close(metrics.column_sum(x, dtype), x.sum(0, dtype=dtype), rtol=1e-12, atol=1e-12)
    assert float(metrics.l0(x)) == pytest.approx(float((x != 0).sum(-1, dtype=torch.float32).mean()))


def test_column_sums_never_widen_the_whole_batch(monkeypatch):
    monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", 1 << 18)
    x = torch.rand(1024, 4096)  # 4M elements: an int64 / float64 copy would be 32 MiB
    mask = x > 0.5
    assert largest_allocation(lambda: mask.sum(0)) >= 8 * x.numel()  # what torch does: the reason for the helper
    for fn in (lambda: metrics.column_sum(mask), lambda: metrics.column_sum(x, torch.float64),
               lambda: metrics.count_true(mask), lambda: metrics.count_nonzero_columns(x)):
        assert largest_allocation(fn) <= 8 * (1 << 18) + x.numel()  # a chunk widened (+ a bool mask of x)


def test_chunked_ce_and_kl_equal_the_whole_batch_answer():
    from sae_transfer.evals import splice
    from sae_transfer.evals.transfer import chunked_logit_stats

    gen = torch.Generator().manual_seed(0)
    clean_BSV, patched_BSV = (torch.randn(5, 7, 300, generator=gen) * 3 for _ in range(2))
    tok_BS = torch.randint(0, 300, (5, 7), generator=gen)
    p_clean = torch.softmax(clean_BSV, dim=-1)
    whole_c, whole_p = splice.logit_stats(clean_BSV, tok_BS, p_clean), splice.logit_stats(patched_BSV, tok_BS, p_clean)
    for chunk in (1, 14, 20, 10_000):  # one sequence, two, two with a ragged end, all at once
        c = chunked_logit_stats(clean_BSV, tok_BS, clean_BSV, chunk_tokens=chunk)
        p = chunked_logit_stats(patched_BSV, tok_BS, clean_BSV, chunk_tokens=chunk)
        torch.testing.assert_close(p.loss_BS, whole_p.loss_BS, rtol=0, atol=1e-6)
        torch.testing.assert_close(p.kl_from(c), whole_p.kl_from(whole_c), rtol=0, atol=1e-6)
        torch.testing.assert_close(c.kl_from(c), torch.zeros(5, 7), rtol=0, atol=1e-6)


def test_chunked_logit_stats_peak_does_not_grow_with_the_batch():
    from sae_transfer.evals import splice
    from sae_transfer.evals.transfer import chunked_logit_stats

    V, S = 100_000, 64
    for B in (4, 8):
        clean, patched = torch.randn(B, S, V).bfloat16(), torch.randn(B, S, V).bfloat16()
        tok = torch.randint(0, V, (B, S))
        chunked = largest_allocation(lambda: chunked_logit_stats(patched, tok, clean, chunk_tokens=S))  # noqa: B023
        whole = largest_allocation(lambda: splice.logit_stats(patched, tok, torch.softmax(clean.float(), -1)))  # noqa: B023
        assert chunked <= 4 * S * V * 1.01  # one sequence's float32 logits
        assert whole >= 4 * B * S * V  # the whole batch's


def _flatten_topk_dense(pre_BF: torch.Tensor, n_keep: int) -> torch.Tensor:
    """The old BatchTopK answer: sort the whole batch (relu(pre).flatten().topk), scattered back to [B, F]."""
    vals, idx = torch.relu(pre_BF).flatten().topk(n_keep, sorted=False)
    return torch.zeros(pre_BF.numel(), dtype=vals.dtype).scatter_(0, idx, vals).view_as(pre_BF)


@pytest.mark.parametrize("case", ["random", "one_huge_row", "three_huge_rows", "ramp", "few_positive", "k_ge_F"])
def test_batch_topk_without_a_full_sort_keeps_exactly_what_the_full_sort_keeps(case):
    from sae_transfer.sae.base import SAEConfig
    from sae_transfer.sae.batchtopk import BatchTopKSAE, batch_topk
    from sae_transfer.training.trainers.topk import select_batch_topk

    gen = torch.Generator().manual_seed(sum(map(ord, case)))
    B, F, k = 48, 300, 3
    pre = torch.randn(B, F, generator=gen, dtype=torch.float64)
    if case == "one_huge_row":  # a BOS-like token: its row holds far more than 4k of the batch's largest
        pre[5] += 50
    elif case == "three_huge_rows":  # rows that need different widenings: c = 12 -> 24 -> .. -> F
        pre[0, :20] += 30
        pre[17, :100] += 30
        pre[40] += 30
    elif case == "ramp":  # every row shifted: the top rows are cut off, the bottom ones settled at once
        pre += torch.linspace(0, 8, B, dtype=torch.float64)[:, None]
    elif case == "few_positive":  # fewer positive values than B·k: zeros fill the rest
        pre -= 3.2
    elif case == "k_ge_F":
        k = F + 7
    n_keep = min(B * k, B * F)
    ref = _flatten_topk_dense(pre, n_keep)
    vals, flat = batch_topk(pre, n_keep, 4 * k)
    assert vals.numel() == n_keep and flat.unique().numel() == n_keep
    assert torch.equal(torch.zeros(B * F, dtype=vals.dtype).scatter_(0, flat, vals).view(B, F), ref)
    assert torch.equal(vals.sort().values, torch.relu(pre).flatten().topk(n_keep).values.sort().values)
    vals32, token, latent = select_batch_topk(pre, k)
    dense = torch.zeros(B, F, dtype=torch.float64)
    dense[token, latent] = vals32.double()
    assert torch.equal(dense, ref.float().double()) and torch.all((token * F + latent).diff() > 0)  # CSR order
    sae = BatchTopKSAE(SAEConfig("batchtopk", 4, F, k=k))
    pre_req = pre.clone().requires_grad_()
    out = sae.activation(pre_req.view(4, B // 4, F))  # [B, S, F]: every leading dim is tokens
    assert torch.equal(out.view(B, F), ref)
    out.sum().backward()
    assert torch.equal(pre_req.grad, (ref > 0).double())


def test_batch_topk_fallback_never_allocates_the_whole_batch():
    from sae_transfer.sae.batchtopk import batch_topk

    B, F, k = 512, 16384, 32
    gen = torch.Generator().manual_seed(0)
    pre = torch.randn(B, F, generator=gen)
    pre[7] += 20  # one token beats the cut-off with all its 4k candidates: the case that sorted B·F values
    assert largest_allocation(lambda: torch.relu(pre).flatten().topk(B * k, sorted=False)) >= 4 * B * F  # the old fallback
    for p in (pre, torch.randn(B, F, generator=gen)):
        peak = largest_allocation(lambda: batch_topk(p, B * k, 4 * k))  # noqa: B023
        assert peak <= B * F // 8  # an eighth of a byte per element (8 bytes each would be 64 MiB)


def test_select_batch_topk_fallback_never_allocates_the_whole_batch():
    """The trainers' selection (CSR order, fp32) on an input that cut off the 4k candidates of a
    token: it widens that token's candidates, never sorting or copying the B·F values."""
    from sae_transfer.training.trainers.topk import select_batch_topk

    B, F, k = 512, 16384, 32
    gen = torch.Generator().manual_seed(1)
    pre = torch.randn(B, F, generator=gen)
    pre[[3, 300]] += 20  # BOS-like tokens: every one of their 4k candidates beats the batch cut-off
    cand = pre.topk(4 * k, dim=-1).values
    assert (cand.min(-1).values > cand.flatten().topk(B * k).values.min()).any()  # the fallback input
    peak = largest_allocation(lambda: select_batch_topk(pre, k))
    assert peak <= B * F // 8  # an eighth of a byte per element: no [B, F] buffer of any dtype
    vals, token, latent = select_batch_topk(pre, k)
    ref_vals, ref_flat = torch.relu(pre).flatten().topk(B * k)
    assert torch.equal(token * F + latent, ref_flat.sort().values)  # exact (no ties in random floats)
    assert torch.equal(vals.sort().values, ref_vals.sort().values)


@pytest.mark.cuda
def test_on_cuda_the_chunked_paths_stay_on_the_device_and_equal_the_cpu_answer():
    # every new kernel path (column sums, chunked CE/KL, BatchTopK's selection) on the GPU: results
    # on the device, equal to the same computation on the CPU
    from sae_transfer.evals.transfer import chunked_logit_stats
    from sae_transfer.sae.batchtopk import batch_topk

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 130, generator=gen).relu()
    cuda_sum = metrics.column_sum(x.cuda() > 0)
    assert cuda_sum.is_cuda and torch.equal(cuda_sum.cpu(), metrics.column_sum(x > 0))
    clean, patched = (torch.randn(4, 9, 500, generator=gen) for _ in range(2))
    tok = torch.randint(0, 500, (4, 9), generator=gen)
    cpu = chunked_logit_stats(patched, tok, clean, chunk_tokens=10)
    dev = chunked_logit_stats(patched.cuda(), tok.cuda(), clean.cuda(), chunk_tokens=10)
    assert dev.loss_BS.is_cuda
    torch.testing.assert_close(dev.loss_BS.cpu(), cpu.loss_BS, rtol=1e-5, atol=1e-5)
    pre = torch.randn(64, 512, generator=gen)
    pre[3] += 20.0  # one BOS-like row forces the widening path
    (vals_cpu, idx_cpu), (vals_dev, idx_dev) = batch_topk(pre, 64 * 4, 16), batch_topk(pre.cuda(), 64 * 4, 16)
    assert vals_dev.is_cuda and idx_dev.is_cuda  # unordered: compare as index-sorted sets
    order_cpu, order_dev = idx_cpu.argsort(), idx_dev.cpu().argsort()
    assert torch.equal(idx_dev.cpu()[order_dev], idx_cpu[order_cpu])
    torch.testing.assert_close(vals_dev.cpu()[order_dev], vals_cpu[order_cpu])
