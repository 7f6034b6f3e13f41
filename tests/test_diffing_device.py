"""The diffing maths on every device: per-latent stats, max-activating examples, Latent Scaling
and a crosscoder training step give the CPU's answers on CUDA. Each test runs on the CPU too
(so the test itself is exercised everywhere); the CUDA cases skip where no GPU exists."""

from __future__ import annotations

import pytest
import torch

from sae_transfer.diffing import examples as ex
from sae_transfer.diffing import latent_scaling as ls_mod
from sae_transfer.diffing import latent_stats as ls
from sae_transfer.diffing.crosscoder import CrossCoder
from sae_transfer.diffing.latent_scaling import crosscoder_scaling, sae_scaling
from tests._diffing import relu_sae

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
D, F = 16, 32


def _sae_and_acts():
    gen = torch.Generator().manual_seed(0)
    sae = relu_sae(torch.randn(D, F, generator=gen) * 0.5, torch.randn(F, D, generator=gen) * 0.3,
                   b_enc_F=-0.2 * torch.ones(F))
    sae.cfg.metadata["activation_scale_factor"] = 1.5  # applied with r = s_eval / 1.5
    return sae, torch.randn(2048, D, generator=gen) * 2.0


@pytest.mark.parametrize("device", DEVICES)
def test_latent_stats_equal_the_cpu_answer(device):
    sae, acts = _sae_and_acts()
    batches = lambda: (acts[i:i + 512] for i in range(0, len(acts), 512))  # noqa: E731
    cpu = ls.model_latent_stats(sae, batches(), 2.0, ls.LatentStatsConfig(device="cpu"))
    dev = ls.model_latent_stats(sae, batches(), 2.0, ls.LatentStatsConfig(device=device))
    assert torch.equal(dev.fire_count_F.cpu(), cpu.fire_count_F)
    torch.testing.assert_close(dev.sum_act_F.cpu(), cpu.sum_act_F, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dev.ev_drop_F.cpu(), cpu.ev_drop_F, rtol=1e-3, atol=1e-5)
    assert dev.ratio == pytest.approx(2.0 / 1.5) and cpu.fire_count_F.sum() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_max_activating_examples_equal_the_cpu_answer(device):
    sae, acts = _sae_and_acts()
    applied, _ = ls.applied_sae(sae, 2.0, torch.device(device))
    seq, pos = torch.arange(len(acts)) // 32, torch.arange(len(acts)) % 32

    class Batch:
        def __init__(self, lo, hi):
            self.acts_BD, self.seq_id_B, self.pos_B = acts[lo:hi], seq[lo:hi], pos[lo:hi]

    batches = [Batch(i, i + 300) for i in range(0, len(acts), 300)]
    cfg = ex.ExamplesConfig(k=4, batch_tokens=256)
    on_dev = ex.collect_max_acts(applied, batches, ex.ExamplesConfig(k=4, batch_tokens=256, device=device))
    on_cpu = ex.collect_max_acts(ls.applied_sae(sae, 2.0, torch.device("cpu"))[0], batches, cfg)
    torch.testing.assert_close(on_dev.value_FK, on_cpu.value_FK, rtol=1e-5, atol=1e-6)
    assert torch.equal(on_dev.hist_FH, on_cpu.hist_FH)


@pytest.mark.parametrize("device", DEVICES)
def test_latent_scaling_and_crosscoder_step_equal_the_cpu_answer(device):
    from sae_transfer.training.config import TrainConfig
    from sae_transfer.training.loop import TrainingRun, train_step
    from sae_transfer.training.trainers.crosscoder import CrosscoderTrainer

    sae, acts = _sae_and_acts()
    betas = {d: sae_scaling(relu_sae(sae.W_enc.detach(), sae.W_dec.detach(), b_enc_F=sae.b_enc.detach()).to(d),
                            [acts.to(d)], torch.arange(F)).beta_error_L.cpu() for d in ("cpu", device)}
    torch.testing.assert_close(betas[device], betas["cpu"], rtol=1e-4, atol=1e-5)

    x_B2D = torch.randn(512, 2 * D, generator=torch.Generator().manual_seed(3))
    results = {}
    for d in ("cpu", device):
        cfg = TrainConfig(arch="batchtopk", d_sae=F, k=4, lr=1e-3, total_tokens=2048, batch_size=512, device=d)
        cc = CrossCoder.create(D, F, 4)
        run = TrainingRun.create(cfg, cc.to(d), 1.0)
        run.trainer = CrosscoderTrainer(run.sae, cfg, run.trainer.sparse_kernels)
        run.trainer.init_weights(torch.Generator().manual_seed(0), torch.zeros(2 * D))  # same draw on every device
        for _ in range(3):
            train_step(run, x_B2D.to(d))
        sc = crosscoder_scaling(run.sae, [x_B2D.to(d).view(-1, 2, D)], torch.arange(F))
        results[d] = (run.sae.W_dec.detach().cpu(), sc.count_L.cpu())
    torch.testing.assert_close(results[device][0], results["cpu"][0], rtol=1e-4, atol=1e-5)
    assert torch.equal(results[device][1], results["cpu"][1])


class _OneDevicePerOp(torch.overrides.TorchFunctionMode):
    """Fails any torch call whose tensor operands (0-dim CPU scalars aside) live on different
    devices — what CUDA would refuse — so a CPU-only host can check device placement against
    the "meta" device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        found = set()

        def visit(a):
            if isinstance(a, torch.Tensor) and not (a.dim() == 0 and a.device.type == "cpu"):
                found.add(a.device.type)
            elif isinstance(a, (list, tuple)):
                for b in a:
                    visit(b)

        visit(args)
        visit(list(kwargs.values()))
        if len(found) > 1 and getattr(func, "__name__", "") not in ("to", "copy_", "cpu"):
            raise AssertionError(f"{getattr(func, '__name__', func)} mixes devices {sorted(found)}")
        return func(*args, **kwargs)


def test_latent_scaler_sums_on_the_directions_device_whatever_the_batches():
    d_LD = torch.randn(3, D, device="meta")  # stands for the GPU: the [B, D] @ [D, L] product stays there
    scaler = ls_mod.LatentScaler(d_LD)
    with _OneDevicePerOp():
        scaler.update(torch.rand(8, 3), torch.randn(8, D), own_LD=torch.randn(3, D))
    assert {t.device.type for t in (scaler.num_L, scaler.f2_L, scaler.count_L)} == {"meta"}


def _stream(parts, done):
    yield from parts
    done.append(True)  # reached only when the consumer asks for more after the last batch


def test_latent_scaling_brings_host_batches_to_the_dictionarys_device():
    sae, acts = _sae_and_acts()
    meta_sae = relu_sae(sae.W_enc.detach(), sae.W_dec.detach(), b_enc_F=sae.b_enc.detach()).to("meta")
    done: list = []
    # every batch is summed on the dictionary's device; only the final [L] results would come back to
    # the host, which a meta tensor cannot do
    with _OneDevicePerOp(), pytest.raises(NotImplementedError, match="meta"):
        sae_scaling(meta_sae, _stream([acts[:512], acts[512:1024]], done), torch.arange(F))
    assert done == [True]  # (a crosscoder's threshold reads a value, so it cannot run on meta: the CUDA test covers it)


@pytest.mark.parametrize("device", DEVICES)
def test_latent_scaling_results_are_on_the_host(device):  # batches on the host or the device alike
    sae, acts = _sae_and_acts()
    applied = relu_sae(sae.W_enc.detach(), sae.W_dec.detach(), b_enc_F=sae.b_enc.detach()).to(device)
    res = sae_scaling(applied, [acts[:512], acts[512:1024].to(device)], torch.arange(F))
    cpu = sae_scaling(relu_sae(sae.W_enc.detach(), sae.W_dec.detach(), b_enc_F=sae.b_enc.detach()), [acts[:1024]],
                      torch.arange(F))
    assert {t.device.type for t in (res.beta_error_L, res.beta_activation_L, res.count_L)} == {"cpu"}
    torch.testing.assert_close(res.beta_error_L, cpu.beta_error_L, rtol=1e-4, atol=1e-5)
    assert torch.equal(res.count_L, cpu.count_L)
    cc = CrossCoder.create(D, F, 4)
    x_B2D = torch.randn(256, 2, D, generator=torch.Generator().manual_seed(1))
    sc = crosscoder_scaling(cc.to(device), [x_B2D[:128], x_B2D[128:].to(device)], torch.arange(F))
    assert {t.device.type for t in (sc.nu_error_L, sc.nu_recon_L, sc.count_L)} == {"cpu"}
