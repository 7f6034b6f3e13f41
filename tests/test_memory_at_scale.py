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
