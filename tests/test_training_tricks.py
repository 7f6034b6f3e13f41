"""Each training trick has a test of its effect: geometric median, schedules, dead tracking,
ghost grads (pre-activation form), resampling, sparse TopK gradients, JumpReLU STE, clipping."""

import dataclasses
import sys

import numpy as np
import pytest
import torch

from sae_transfer.sae import SAEConfig, make_sae
from sae_transfer.training import TrainConfig
from sae_transfer.training.loop import TrainingRun, train_step
from sae_transfer.training.run import estimate_scale, fresh_run
from sae_transfer.training.schedules import lr_multiplier, rewarmup_multiplier, sparsity_multiplier
from sae_transfer.training.sources import in_memory_factory
from sae_transfer.training.trainers import make_trainer
from sae_transfer.training.tricks import DeadTracker, geometric_median, ghost_grad_loss, resample_dead_latents


def _scipy_geometric_median(points_ND: torch.Tensor) -> torch.Tensor:
    """Independent answer: BFGS on Σ‖p − y‖ with its analytic gradient, from the coordinate-wise median."""
    from scipy.optimize import minimize

    p = points_ND.double().numpy()

    def objective(y):
        diff = p - y
        dist = np.linalg.norm(diff, axis=1)
        return dist.sum(), -(diff / dist[:, None]).sum(0)

    res = minimize(objective, np.median(p, axis=0), jac=True, method="BFGS", options={"gtol": 1e-12})
    return torch.from_numpy(res.x).float()


def test_geometric_median_known_answers():
    # 1-D: the geometric median is the median, far from the mean (21.2)
    pts = torch.tensor([[0.0], [1.0], [2.0], [3.0], [100.0]])
    assert abs(geometric_median(pts).item() - 2.0) < 1e-3
    # equilateral triangle: the Fermat point is the centroid
    tri = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, 3**0.5 / 2]])
    assert torch.allclose(geometric_median(tri), tri.mean(0), atol=1e-4)


def test_geometric_median_resists_a_far_outlier_in_2d():
    cluster = torch.tensor([[0.0, 0.0], [1.0, 0.2], [0.3, 1.1], [-0.8, 0.4], [0.5, -0.9], [-0.4, -0.6], [1.2, 1.0]])
    outlier = torch.tensor([[1000.0, -800.0]])
    pts = torch.cat([cluster, outlier])
    median = geometric_median(pts)
    assert torch.allclose(median, _scipy_geometric_median(pts), atol=1e-4)
    # the mean is dragged ~125 units away; the median stays inside the cluster's box
    assert pts.mean(0).norm() > 100
    assert (median >= cluster.min(0).values).all() and (median <= cluster.max(0).values).all()
    # pushing the outlier 1000× farther along the ray from the median leaves every unit vector
    # of the optimality condition unchanged, so the (unique) median must not move
    farther = torch.cat([cluster, median + 1000 * (outlier - median)])
    assert torch.allclose(geometric_median(farther), median, atol=1e-4)


def test_lr_schedule_values():
    # 100 steps, 10% warm-up, 20% decay
    m = [lr_multiplier(s, 100, 0.1, 0.2) for s in range(100)]
    assert m[0] == pytest.approx(0.1) and m[4] == pytest.approx(0.5) and m[9] == pytest.approx(1.0)
    assert m[10] == m[50] == m[79] == 1.0
    assert m[80] == pytest.approx(1.0) and m[90] == pytest.approx(0.5) and m[99] == pytest.approx(0.05)
    assert lr_multiplier(5, 100, 0.0, 0.0) == 1.0
    # fine-tune recipe: 5% warm-up of 1000 steps -> half LR at step 24
    assert lr_multiplier(24, 1000, 0.05, 0.2) == pytest.approx(0.5)


def test_rewarmup_and_sparsity_warmup():
    assert rewarmup_multiplier(99, [100], 0.1, 50) == 1.0
    assert rewarmup_multiplier(100, [100], 0.1, 50) == pytest.approx(0.1)
    assert rewarmup_multiplier(125, [100], 0.1, 50) == pytest.approx(0.55)
    assert rewarmup_multiplier(150, [100], 0.1, 50) == 1.0
    assert sparsity_multiplier(0, 100, 0.1) == pytest.approx(0.1)
    assert sparsity_multiplier(9, 100, 0.1) == 1.0 and sparsity_multiplier(3, 100, 0.0) == 1.0


def test_dead_tracker_window():
    tr = DeadTracker(3, window_tokens=100)
    tr.update(torch.tensor([True, False, False]), 60)
    assert not tr.dead_mask().any()
    tr.update(torch.tensor([False, True, False]), 60)
    assert tr.dead_mask().tolist() == [False, False, True]
    tr.update(torch.tensor([False, False, False]), 60)
    assert tr.dead_mask().tolist() == [True, False, True]
    tr.add_counts(torch.tensor([6, 60, 0]), 60)
    assert torch.allclose(tr.log10_density(), torch.tensor([-1.0, 0.0, -10.0]))
    restored = DeadTracker(3, 100)
    restored.load_state_tensors(tr.state_tensors())
    assert torch.equal(restored.dead_mask(), tr.dead_mask())


def test_ghost_grads_match_the_definition_by_hand():
    """Anthropic's Jan 2024 ghost grads, corrected form, differentiated by hand: dead latents
    output h = exp(pre) @ W_dec[dead]; per token s = ‖r‖ / (2‖h‖) (a constant), r = x − x̂ (a
    constant); G = mean_b ‖s·h − r‖²; loss = G · (mse / G) with the ratio a constant. So
    ∂loss/∂pre[b, f] = (mse/G)·(2/B)·s_b·⟨s_b·h_b − r_b, W_dec[f]⟩·exp(pre[b, f]) for dead f
    (0 for live f) and ∂loss/∂W_dec[f] = (mse/G)·(2/B)·Σ_b s_b·exp(pre[b, f])·(s_b·h_b − r_b)."""
    gen = torch.Generator().manual_seed(0)
    B, D, F = 8, 4, 6
    x = torch.randn(B, D, generator=gen, dtype=torch.float64)
    x_hat = x * 0.5 + 0.1 * torch.randn(B, D, generator=gen, dtype=torch.float64)
    pre = (-torch.rand(B, F, generator=gen, dtype=torch.float64) - 0.5).requires_grad_()  # dead latents stay below 0
    W_dec = torch.randn(F, D, generator=gen, dtype=torch.float64).requires_grad_()
    dead = torch.tensor([True, False, True, False, False, True])
    mse = torch.tensor(0.7, dtype=torch.float64)
    loss = ghost_grad_loss(x, x_hat, pre, W_dec, dead, mse)
    loss.backward()

    with torch.no_grad():
        r = x - x_hat
        act = torch.exp(pre[:, dead])  # exp(ReLU(pre)) would be 1 here and carry no gradient
        h = act @ W_dec[dead]
        s = r.norm(dim=-1) / (2 * h.norm(dim=-1))
        err = s[:, None] * h - r
        G = err.pow(2).sum(-1).mean()
        c = mse / G * 2 / B
        grad_pre = torch.zeros(B, F, dtype=torch.float64)
        grad_pre[:, dead] = c * s[:, None] * (err @ W_dec[dead].T) * act
        grad_W_dec = torch.zeros(F, D, dtype=torch.float64)
        grad_W_dec[dead] = c * (s[:, None] * act).T @ err
    assert loss.item() == pytest.approx(0.7, rel=1e-9)  # rescaled to the MSE: only the direction counts
    assert grad_pre[:, dead].abs().min() > 0
    assert torch.allclose(pre.grad, grad_pre, rtol=1e-9, atol=1e-12)
    assert torch.allclose(W_dec.grad, grad_W_dec, rtol=1e-9, atol=1e-12)


def test_resampling_revives_dead_latents_and_resets_adam():
    torch.manual_seed(0)
    cfg = TrainConfig(arch="relu", d_sae=32, total_tokens=2560, batch_size=256, l1_coefficient=0.1, device="cpu")
    sae = make_sae(SAEConfig("standard", 8, 32))
    run = TrainingRun.create(cfg, sae, 1.0)
    run.trainer.init_weights(torch.Generator().manual_seed(0), torch.zeros(8))
    x = torch.randn(256, 8)
    train_step(run, x)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[:10] = True
    with torch.no_grad():
        sae.b_enc[:10] = -100.0  # these latents can never fire
    assert (sae.encode(x)[:, :10] == 0).all()
    n = resample_dead_latents(sae, dead, x, run.optimizer, torch.Generator().manual_seed(1))
    assert n == 10
    fired = (sae.encode(x)[:, :10] > 0).any(0)
    assert fired.all()
    state = run.optimizer.state[sae.W_enc]
    assert state["exp_avg"][:, :10].abs().sum() == 0 and state["exp_avg"][:, 10:].abs().sum() > 0
    assert torch.allclose(sae.W_dec[:10].norm(dim=-1), sae.W_dec[10:].norm(dim=-1).mean().expand(10))


def _run_with_resampling(dead_window_tokens: int, steps: int = 10):
    """A relu run resampling every 5 steps (LR × 0.1, 4-step re-warm-up) with latents 0-2 unable
    to fire; returns the run and the LR each step trained with."""
    acts = torch.randn(2048, 8, generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(arch="relu", d_sae=32, total_tokens=256 * 20, batch_size=256, resample_every_steps=5,
                      resample_rewarmup_steps=4, resample_lr_drop=0.1, dead_window_tokens=dead_window_tokens,
                      lr_decay_frac=0.0, l1_warmup_frac=0.0, scale_estimate_tokens=512,
                      device="cpu")
    run = fresh_run(cfg, in_memory_factory(acts, 256), 8, None)
    with torch.no_grad():
        run.sae.b_enc[:3] = -1e3  # dead once dead_window_tokens have passed
    lrs = []
    for x in in_memory_factory(acts, 256)(0):
        train_step(run, x)
        lrs.append(run.optimizer.param_groups[0]["lr"])
        if run.state.step == steps:
            break
    return run, lrs


def test_resampling_in_loop_drops_lr_then_rewarms():
    run, lrs = _run_with_resampling(dead_window_tokens=256)
    assert run.state.resample_steps[0] == 5
    assert (run.sae.b_enc[:3] > -1e3).all()  # the dead latents were resampled
    # the resample after step 5 applies from the 6th step: LR × 0.1, rising linearly over 4 steps
    lr = run.cfg.lr
    assert lrs == pytest.approx([lr] * 5 + [lr * m for m in (0.1, 0.325, 0.55, 0.775)] + [lr])


def test_resampling_with_nothing_dead_leaves_the_lr_alone():
    run, lrs = _run_with_resampling(dead_window_tokens=10**9)  # nothing can count as dead yet
    assert run.state.resample_steps == []
    assert lrs == pytest.approx([run.cfg.lr] * 10)


def _dense_topk_loss(sae, x, k):
    pre = sae.pre_acts(x)
    vals, idx = pre.topk(k, dim=-1)
    feats = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
    return (sae.decode(feats) - x).pow(2).sum(-1).mean()


def test_topk_sparse_gradients_equal_dense_autograd():
    cfg = TrainConfig(arch="topk", d_sae=64, k=5, total_tokens=64, batch_size=32, aux_coefficient=0.0)
    sae = make_sae(SAEConfig("topk", 16, 64, k=5))
    trainer = make_trainer(sae, cfg)
    trainer.init_weights(torch.Generator().manual_seed(0), torch.randn(16) * 0.1)
    x = torch.randn(32, 16)
    trainer.loss(x, 0, torch.zeros(64, dtype=torch.bool)).loss.backward()
    sparse = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    _dense_topk_loss(sae, x, 5).backward()
    for n, p in sae.named_parameters():
        assert torch.allclose(sparse[n], p.grad, atol=1e-5), n


def test_batchtopk_sparse_decoder_equals_dense_and_learns_threshold():
    cfg = TrainConfig(arch="batchtopk", d_sae=64, k=3, total_tokens=64, batch_size=32, aux_coefficient=0.0)
    sae = make_sae(SAEConfig("batchtopk", 16, 64, k=3))
    trainer = make_trainer(sae, cfg)
    trainer.init_weights(torch.Generator().manual_seed(0), torch.zeros(16))
    x = torch.randn(32, 16)
    with torch.no_grad():  # rows of different norms: selection is by relu(pre)·‖row‖
        sae.W_dec.mul_(torch.rand(64, 1, generator=torch.Generator().manual_seed(1)) * 3 + 0.05)
    out = trainer.loss(x, 0, torch.zeros(64, dtype=torch.bool))
    saved = trainer.inference_sae()  # norms folded in: its pre-activations are the scores
    assert torch.allclose(out.x_hat_BD, saved(x), atol=1e-5)
    assert out.fire_count_F.sum().item() == 96
    feats = saved.encode(x)
    # the threshold is the smallest kept score, i.e. in the saved SAE's units
    assert sae.threshold.item() == pytest.approx(feats[feats > 0].min().item(), rel=1e-5)


def test_jumprelu_threshold_gets_straight_through_gradient():
    cfg = TrainConfig(arch="jumprelu", d_sae=4, total_tokens=2, batch_size=2, jumprelu_bandwidth=0.1,
                      l1_coefficient=1.0, l1_warmup_frac=0.0)
    sae = make_sae(SAEConfig("jumprelu", 2, 4))
    trainer = make_trainer(sae, cfg)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2, 4))
        sae.W_dec.zero_()
        sae.threshold.fill_(0.5)
    x = torch.tensor([[0.52, 0.9], [0.1, 0.48]])  # latent 0: 0.52 within ε/2 of θ; latent 1: 0.48 within
    out = trainer.loss(x, 0, torch.zeros(4, dtype=torch.bool))
    assert out.grads_done  # the fused step sets .grad itself
    # step penalty: d/dθ mean_b Σ H = −(1/ε)·(#points in the window)/B; MSE term has no θ-dependence here
    # except through the feats that cross: latent 0 (0.52 active) contributes -(θ/ε)·g_f with g_f = 0 (W_dec = 0)
    assert sae.threshold.grad[0].item() == pytest.approx(-(1 / 0.1) * 1 / 2)
    assert sae.threshold.grad[1].item() == pytest.approx(-(1 / 0.1) * 1 / 2)
    assert sae.threshold.grad[2].item() == 0.0


def test_grad_clipping_bounds_the_update_norm(monkeypatch):
    acts = torch.randn(512, 8) * 100
    cfg = TrainConfig(arch="relu", d_sae=16, total_tokens=512, batch_size=256, grad_clip=1e-3, normalize_activations=False,
                      device="cpu")
    run = fresh_run(cfg, in_memory_factory(acts, 256), 8, None)
    seen = []
    original = run.optimizer.step
    monkeypatch.setattr(run.optimizer, "step",
                        lambda: (seen.append(torch.sqrt(sum(p.grad.pow(2).sum() for p in run.sae.parameters()))), original()))
    train_step(run, acts[:256])
    assert seen[0].item() == pytest.approx(1e-3, rel=1e-3)


def test_scale_estimate_gives_mean_norm_sqrt_d():
    x = torch.randn(1000, 64) * 7 + 3
    s = estimate_scale(x)
    assert (x * s).norm(dim=-1).mean().item() == pytest.approx(8.0, rel=1e-5)


def test_same_seed_same_weights_on_cpu(tmp_path):
    from sae_transfer.training.run import train_sae

    acts = torch.randn(4096, 8)
    cfg = TrainConfig(arch="topk", d_sae=32, k=4, total_tokens=256 * 12, batch_size=256, log_every_steps=5,
                      checkpoint_every_tokens=0, scale_estimate_tokens=1024, device="cpu")
    a = train_sae(cfg, in_memory_factory(acts, 256), 8, tmp_path / "a", progress=False)
    b = train_sae(cfg, in_memory_factory(acts, 256), 8, tmp_path / "b", progress=False)
    c = train_sae(dataclasses.replace(cfg, seed=1), in_memory_factory(acts, 256, seed=1), 8, tmp_path / "c", progress=False)
    from safetensors.torch import load_file

    wa, wb, wc = (load_file(str(r.sae_dir / "sae_weights.safetensors")) for r in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["W_enc"], wc["W_enc"])


def test_relu_fused_gradients_equal_autograd():
    cfg = TrainConfig(arch="relu", d_sae=64, total_tokens=640, batch_size=32, l1_coefficient=0.7, l1_warmup_frac=0.2)
    sae = make_sae(SAEConfig("standard", 16, 64))
    trainer = make_trainer(sae, cfg)
    trainer.init_weights(torch.Generator().manual_seed(0), torch.randn(16) * 0.3)
    x = torch.randn(32, 16) + 0.5
    fused = trainer.fused_loss_and_grads(x, step=1)
    grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad(set_to_none=True)
    ref = trainer.autograd_loss(x, 1, torch.zeros(64, dtype=torch.bool))
    ref.loss.backward()
    assert fused.loss.item() == pytest.approx(ref.loss.item(), rel=1e-5)
    assert torch.equal(fused.fire_count_F, ref.fire_count_F)
    for n, p in sae.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-5, rtol=1e-4), n


def test_jumprelu_fused_gradients_equal_autograd(monkeypatch):
    monkeypatch.setattr("sae_transfer.training.trainers.jumprelu.SPARSE_DENSITY", 1.0)
    cfg = TrainConfig(arch="jumprelu", d_sae=64, total_tokens=640, batch_size=64, l1_coefficient=0.3,
                      jumprelu_bandwidth=0.5, l1_warmup_frac=0.0)
    sae = make_sae(SAEConfig("jumprelu", 16, 64))
    trainer = make_trainer(sae, cfg)
    trainer.init_weights(torch.Generator().manual_seed(0), torch.randn(16) * 0.3)
    with torch.no_grad():
        sae.threshold.copy_(torch.rand(64) * 0.2 + 0.3)  # a few percent of pairs near/above θ
    x = torch.randn(64, 16)
    sae.zero_grad(set_to_none=True)
    ref = trainer.autograd_loss(x, 3)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    for sparse_ok in (False, True):  # dense passes; sparse over the pairs near/above θ
        fused = trainer.fused_loss_and_grads(x, step=3, sparse_ok=sparse_ok)
        assert fused.loss.item() == pytest.approx(ref.loss.item(), rel=1e-5)
        assert sae.threshold.grad.abs().sum() > 0
        for n, p in sae.named_parameters():
            assert torch.allclose(ref_grads[n], p.grad, atol=1e-5, rtol=1e-4), (sparse_ok, n)


def test_batch_topk_candidate_shortcut_is_exact():
    from sae_transfer.training.trainers.topk import select_batch_topk

    gen = torch.Generator().manual_seed(0)
    pre = torch.randn(64, 256, generator=gen)
    pre[3] += 10  # one token holds far more than 4k of the batch's largest values: fallback path
    for p in (torch.randn(64, 256, generator=gen), pre):
        vals, token, latent = select_batch_topk(p, 2)
        dense = torch.zeros_like(p)
        dense[token, latent] = vals
        ref_vals, ref_idx = torch.relu(p).flatten().topk(128)
        ref = torch.zeros(p.numel()).scatter_(0, ref_idx, ref_vals).view_as(p)
        assert torch.equal(dense, ref)
        assert torch.all(token.diff() >= 0)  # CSR order


def test_ghost_grads_in_loop_reach_dead_latents():
    acts = torch.randn(1024, 8)
    cfg = TrainConfig(arch="relu", d_sae=32, total_tokens=256 * 4, batch_size=256, ghost_grads=True,
                      dead_window_tokens=256, scale_estimate_tokens=256, grad_clip=0.0, device="cpu")
    run = fresh_run(cfg, in_memory_factory(acts, 256), 8, None)
    with torch.no_grad():
        run.sae.b_enc[:5] = -8.0  # never fire
    batches = iter(in_memory_factory(acts, 256)(0))
    train_step(run, next(batches))  # after this, latents 0-4 count as dead
    assert run.dead.dead_mask()[:5].all()
    before = run.sae.W_enc[:, :5].clone()
    train_step(run, next(batches))
    assert not torch.equal(run.sae.W_enc[:, :5], before)  # only the ghost term can move them


def test_topk_selects_by_decoder_norm_and_saves_the_same_function_with_unit_rows():
    cfg = TrainConfig(arch="topk", d_sae=64, k=5, total_tokens=64, batch_size=32, aux_coefficient=0.0)
    sae = make_sae(SAEConfig("topk", 16, 64, k=5))
    trainer = make_trainer(sae, cfg)
    trainer.init_weights(torch.Generator().manual_seed(0), torch.randn(16) * 0.1)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # rows of very different norms, as training leaves them
        sae.W_dec.mul_(torch.rand(64, 1, generator=gen) * 3 + 0.05)
        sae.b_enc.copy_(torch.randn(64, generator=gen) * 0.01)
    x = torch.randn(32, 16, generator=gen) * 3
    x_hat = trainer.loss(x, 0, None).x_hat_BD
    # by hand: keep each token's 5 largest relu(pre)·‖row‖, add relu(pre)·row for those
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    norms = sae.W_dec.norm(dim=-1)
    idx = (pre * norms).topk(5, dim=-1).indices
    feats = torch.zeros_like(pre).scatter(-1, idx, torch.relu(pre.gather(-1, idx)))
    assert torch.allclose(x_hat, feats @ sae.W_dec + sae.b_dec, atol=1e-5)
    saved = trainer.inference_sae()
    assert torch.allclose(saved.W_dec.norm(dim=-1), torch.ones(64), atol=1e-5)
    assert torch.allclose(saved(x), x_hat, atol=1e-4)
    assert torch.allclose(norms, sae.W_dec.norm(dim=-1))  # the trained module is left as it was


@pytest.mark.parametrize("arch,sae_arch",
                         [("relu", "standard"), ("topk", "topk"), ("batchtopk", "batchtopk"), ("jumprelu", "jumprelu")])
def test_first_reconstruction_is_no_worse_than_the_decoder_bias_alone(arch, sae_arch):
    # inputs of mean norm √d, as training sees them: an untrained SAE should add little to b_dec
    # (with W_enc = W_decᵀ at norm 1, TopK added k random rows of weight ≈ 3 and started far worse)
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(1))
    cfg = TrainConfig(arch=arch, d_sae=128, k=8, total_tokens=256, batch_size=256)
    sae = make_sae(SAEConfig(sae_arch, 16, 128, k=8 if arch in ("topk", "batchtopk") else None))
    trainer = make_trainer(sae, cfg)
    b_dec = torch.full((16,), 0.5)
    trainer.init_weights(torch.Generator().manual_seed(0), b_dec)
    out = trainer.loss(x, 0, None)
    mse_bias_only = (x - b_dec).pow(2).sum(-1).mean()  # by hand: reconstruct every token as b_dec
    assert out.mse.item() < 1.1 * mse_bias_only.item()


@pytest.mark.parametrize("arch,expect_zero", [("relu", True), ("topk", False), ("batchtopk", False), ("jumprelu", False)])
def test_b_dec_auto_init_is_zeros_for_relu_and_the_geometric_median_otherwise(arch, expect_zero):
    acts = torch.randn(1024, 8, generator=torch.Generator().manual_seed(0)) + 3.0
    cfg = TrainConfig(arch=arch, d_sae=32, k=4, total_tokens=256, batch_size=256, scale_estimate_tokens=1024,
                      normalize_activations=False, device="cpu")
    run = fresh_run(cfg, in_memory_factory(acts, 256, shuffle=False), 8, None)
    expected = torch.zeros(8) if expect_zero else _scipy_geometric_median(acts)
    assert torch.allclose(run.sae.b_dec, expected, atol=1e-3)
    explicit = fresh_run(dataclasses.replace(cfg, init_b_dec="geometric_median"), in_memory_factory(acts, 256, shuffle=False),
                         8, None)
    assert torch.allclose(explicit.sae.b_dec, _scipy_geometric_median(acts), atol=1e-3)


def _count_host_reads(monkeypatch) -> list[str]:
    """Record every tensor -> host read (item, int, float, bool, tolist, nonzero) made from the package."""
    calls: list[str] = []
    for name in ("item", "tolist", "nonzero", "__int__", "__float__", "__bool__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            caller = caller.replace("\\", "/")
            if "/sae_transfer/" in caller and "/tests/" not in caller:
                calls.append(f"{_name} from {caller.rsplit('/', 1)[-1]}:{sys._getframe(1).f_lineno}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_dead_latent_steps_read_nothing_back_from_the_device_between_log_steps(monkeypatch, arch):
    """Once latents are dead, AuxK / ghost grads run every step on masks, with no host sync:
    the tracker reads the longest silence on log steps only (one read there), never between."""
    n_steps = 8
    acts = torch.randn(256 * n_steps, 8, generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(arch=arch, d_sae=32, k=4, total_tokens=256 * n_steps, batch_size=256, ghost_grads=arch == "relu",
                      aux_coefficient=1 / 32, dead_window_tokens=256, scale_estimate_tokens=256, grad_clip=0.0,
                      log_every_steps=1000, resample_every_steps=0, device="cpu")  # log steps: 0 and the last, 7
    run = fresh_run(cfg, in_memory_factory(acts, 256), 8, None)
    with torch.no_grad():
        run.sae.b_enc[:5] = -8.0  # never fire
    batches = [x for x, _ in zip(in_memory_factory(acts, 256)(0), range(n_steps))]  # (CPU batches: no device read)
    train_step(run, batches[0])  # step 0 (a log step); afterwards latents 0-4 count as dead
    calls = _count_host_reads(monkeypatch)
    outs = [train_step(run, raw)[1] for raw in batches[1:-1]]  # steps 1-6: six non-log steps, a dead window each
    assert calls == [], calls  # nothing at all, the tracker included
    assert run.dead.dead_mask()[:5].all()
    for out in outs:  # the dead-latent term did run: AuxK adds 1/32 (its weights are 0), ghost grads add the MSE
        if arch == "topk":
            assert out.loss.item() == pytest.approx(out.mse.item() + 1 / 32, rel=1e-5)
        else:  # MSE + L1 term + ghost term (= the MSE)
            assert out.loss.item() >= 2 * out.mse.item() * (1 - 1e-5)
    del calls[:]  # (the .item() calls above)
    train_step(run, batches[-1])  # step 7, the last: a log step
    assert [c for c in calls if " from tricks.py:" in c] == [calls[0]] and len(calls) == 1, calls  # one read, the tracker's


def test_dead_tracker_reads_the_device_only_when_asked_exactly(monkeypatch):
    tracker = DeadTracker(6, window_tokens=100)
    fired = torch.tensor([True, True, False, True, True, True])
    calls = _count_host_reads(monkeypatch)
    for step in range(500):  # 50 windows of 10 batches: latent 2 dead from the tenth batch on
        tracker.update(fired, 10)
        assert tracker.any_dead() == (step >= 9)  # may be dead, from the host bound alone
    assert calls == []
    assert tracker.any_dead(exact=True) and len(calls) == 1  # exact: one read
    tracker.update(torch.ones(6, dtype=torch.bool), 10)  # all revived
    assert tracker.any_dead()  # the bound still allows a dead latent (no read), and the mask says none is
    assert len(calls) == 1 and not tracker.dead_mask().any()
    assert not tracker.any_dead(exact=True) and len(calls) == 2
    for _ in range(9):  # the exact read tightened the bound to 10: 90 more tokens cannot make a latent dead
        tracker.update(fired, 10)
        assert not tracker.any_dead() and not tracker.any_dead(exact=True)
    assert len(calls) == 2


def test_dead_latent_losses_on_masks_equal_the_index_form_and_vanish_with_no_dead_latent():
    from sae_transfer.training.trainers.topk import aux_k_loss

    gen = torch.Generator().manual_seed(0)
    B, D, F = 16, 6, 40
    x = torch.randn(B, D, generator=gen, dtype=torch.float64)
    x_hat = x * 0.5
    pre = torch.randn(B, F, generator=gen, dtype=torch.float64).requires_grad_()
    W_dec = torch.randn(F, D, generator=gen, dtype=torch.float64).requires_grad_()
    for n_dead, aux_k in ((7, 3), (7, 20), (0, 3)):
        dead = torch.zeros(F, dtype=torch.bool)
        dead[torch.randperm(F, generator=gen)[:n_dead]] = True
        idx = dead.nonzero().squeeze(-1)
        for fn in (lambda: aux_k_loss(x, x_hat, pre, W_dec, dead, aux_k),  # noqa: B023
                   lambda: ghost_grad_loss(x, x_hat, pre, W_dec, dead, torch.tensor(0.3, dtype=torch.float64))):  # noqa: B023
            pre.grad = W_dec.grad = None
            loss = fn()
            loss.backward()
            if n_dead == 0:
                assert loss.item() == 0.0 and not pre.grad.any() and not W_dec.grad.any()
            else:
                assert loss.item() > 0 and torch.isfinite(pre.grad).all() and torch.isfinite(W_dec.grad).all()
                assert not pre.grad[:, ~dead].any() and pre.grad[:, dead].any()
    # AuxK by hand on the dead latents alone (the old index form)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[[1, 4, 9, 30]] = True
    idx = dead.nonzero().squeeze(-1)
    with torch.no_grad():
        v, i = pre[:, idx].topk(3, dim=-1)
        e_hat = (torch.relu(v)[..., None] * W_dec[idx[i]]).sum(1)
        r = x - x_hat
        expected = (e_hat - r).pow(2).sum(-1).mean() / r.pow(2).sum(-1).mean()
    assert aux_k_loss(x, x_hat, pre, W_dec, dead, 3).item() == pytest.approx(expected.item(), rel=1e-12)
