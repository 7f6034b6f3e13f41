"""Training on any device and in bf16: every tensor a trainer creates names its device, no
step waits on the device between logging steps, bf16 matmuls follow autocast's answer, the
dense and sparse TopK kernels agree, runtime options never block a resume, bad devices give
one clear error. `cuda`-marked tests compare a GPU with the CPU where a GPU exists."""

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from sae_transfer.errors import UserError
from sae_transfer.sae import SAEConfig, make_sae
from sae_transfer.storage import checkpoints as ckpt
from sae_transfer.training import TrainConfig
from sae_transfer.training import device as device_mod
from sae_transfer.training import loop as loop_mod
from sae_transfer.training.loop import TrainingRun, train_step
from sae_transfer.training.run import fresh_run, train_sae
from sae_transfer.training.sources import in_memory_factory
from sae_transfer.training.trainers import make_trainer
from tests.test_training_loop import sparse_acts

D = 16
ARCHS = {  # arch -> TrainConfig fields that make a few steps meaningful at d_in 16
    "relu": dict(l1_coefficient=0.3),
    "topk": dict(k=4),
    "batchtopk": dict(k=4),
    "jumprelu": dict(l1_coefficient=0.02, jumprelu_init_threshold=0.05, jumprelu_bandwidth=0.05),
}
FACTORIES = {"zeros", "ones", "empty", "full", "arange", "tensor", "randn", "rand", "randint", "eye", "linspace", "randperm"}


def _cfg(arch: str, **fields) -> TrainConfig:
    base = dict(arch=arch, d_sae=64, total_tokens=256 * 12, batch_size=256, lr=3e-3, log_every_steps=4,
                checkpoint_every_tokens=0, scale_estimate_tokens=1024, dead_window_tokens=512, **ARCHS[arch])
    base["device"] = "cpu"  # None would mean CUDA when available: these tests mean the CPU unless they name a device
    return TrainConfig(**{**base, **fields})


class _StrictTorch:
    """`torch` as a module sees it, except that factory calls without device= are recorded."""

    def __init__(self, missing: list):
        self._missing = missing

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name not in FACTORIES:
            return attr

        def factory(*args, **kwargs):
            if "device" not in kwargs and "out" not in kwargs:
                self._missing.append(name)
            return attr(*args, **kwargs)

        return factory


TRAINING_MODULES = ["sae_transfer.training.trainers.base", "sae_transfer.training.trainers.relu",
                    "sae_transfer.training.trainers.topk", "sae_transfer.training.trainers.batchtopk",
                    "sae_transfer.training.trainers.jumprelu", "sae_transfer.training.tricks", "sae_transfer.training.loop"]


@pytest.mark.parametrize("arch,fields", [
    ("relu", {}), ("relu", {"ghost_grads": True}), ("topk", {}), ("topk", {"sparse_kernels": "dense"}),
    ("batchtopk", {}), ("batchtopk", {"sparse_kernels": "dense"}), ("jumprelu", {}),
    ("jumprelu", {"sparse_kernels": "dense"}), ("jumprelu", {"jumprelu_l0_mode": "tanh"}),
])
def test_every_tensor_a_step_creates_names_its_device(monkeypatch, arch, fields):
    # A factory call without device= lands on the CPU even when the SAE is on a GPU (autograd
    # backwards run on a worker thread where no default device applies): that was the crash.
    acts = sparse_acts(2048)
    cfg = _cfg(arch, dead_window_tokens=256, **fields)
    run = fresh_run(cfg, in_memory_factory(acts, 256), D, None)
    with torch.no_grad():
        run.sae.b_enc[:8] = -50.0  # dead latents: ghost grads and AuxK run too
    missing: list[str] = []
    for name in TRAINING_MODULES:
        monkeypatch.setattr(f"{name}.torch", _StrictTorch(missing))
    for x in in_memory_factory(acts, 256)(0):
        train_step(run, x)
        if run.state.step == 3:
            break
    assert missing == [], f"factories called without device=: {missing}"
    assert run.dead.dead_mask()[:8].all()  # the dead-latent paths did run


class _SyncCounter:
    """Counts the Tensor methods that make the host wait for the device."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def counted(t, *args):
            self.calls.append(name)
            return original(t, *args)

        return counted


@pytest.mark.parametrize("arch,fields,data", [("relu", {}, "sparse"), ("topk", {}, "sparse"),
                                              ("topk", {"sparse_kernels": "dense"}, "sparse"),
                                              ("batchtopk", {"sparse_kernels": "dense"}, "sparse"),
                                              ("batchtopk", {"sparse_kernels": "dense"}, "uniform"),
                                              ("batchtopk", {"sparse_kernels": "dense"}, "bos"),
                                              ("jumprelu", {"sparse_kernels": "dense"}, "sparse")])
def test_steps_between_log_steps_never_wait_on_the_device(monkeypatch, arch, fields, data):
    from sae_transfer.training.trainers import topk as topk_mod

    acts = sparse_acts(4096)
    if data != "sparse":  # near-identical tokens: each holds about k of the batch's largest, none is cut off
        acts = acts[:1] + 1e-3 * torch.randn(acts.shape, generator=torch.Generator().manual_seed(1))
    if data == "bos":  # one high-norm (BOS-like) token a batch: it holds far more than 4k of the batch's largest
        acts[::256] *= 30
    cfg = _cfg(arch, dead_window_tokens=10**9, log_every_steps=100, **fields)
    run = fresh_run(cfg, in_memory_factory(acts, 256, shuffle=False), D, None)
    batches = [x for x, _ in zip(in_memory_factory(acts, 256, shuffle=False)(0), range(5))]  # read on the host, before counting
    selections: list[tuple[torch.Tensor, int, int]] = []  # BatchTopK's inputs, one per step

    def recorded(pre_BF, n_keep, c, _original=topk_mod.batch_topk):
        selections.append((pre_BF.detach().clone(), n_keep, c))
        return _original(pre_BF, n_keep, c)

    monkeypatch.setattr(topk_mod, "batch_topk", recorded)
    train_step(run, batches[0])  # step 0 is a log step
    del selections[:]
    counter = _SyncCounter(monkeypatch)
    reads = []
    for x in batches[1:]:
        before = len(counter.calls)
        train_step(run, x)
        reads.append(len(counter.calls) - before)
    monkeypatch.undo()
    if arch != "batchtopk":
        assert reads == [0] * 4, counter.calls
        return
    # BatchTopK's exactness check is its one designed sync per step. Where some token's 4k
    # candidates are all above the cut-off (the fallback), exactness without sorting the B·F
    # values needs a data-dependent width: batch_topk widens the cut-off rows' candidates
    # 4k -> 8k -> .. -> F, one read per round, so at most ceil(log2(F / 4k)) reads in all.
    assert len(selections) == len(reads) == 4
    fell_back = []
    for (pre_BF, n_keep, c), n_reads in zip(selections, reads):
        cand_BC = torch.relu(pre_BF).topk(c, dim=-1).values
        fallback = c < pre_BF.shape[1] and bool((cand_BC.min(-1).values > cand_BC.flatten().topk(n_keep).values.min()).any())
        fell_back.append(fallback)
        allowed = max(1, math.ceil(math.log2(pre_BF.shape[1] / c))) if fallback else 1
        assert n_reads <= allowed, (fallback, reads, counter.calls)
    if data == "uniform":
        assert not any(fell_back) and reads == [1] * 4, (reads, counter.calls)
    elif data == "bos":
        assert all(fell_back), fell_back
    # (data == "sparse": at this tiny F = 16k, ordinary batches fall back too)


def test_nonfinite_loss_between_checks_names_its_step_and_saves_nothing(tmp_path):
    acts = sparse_acts(4096)
    cfg = _cfg("topk", total_tokens=256 * 16, log_every_steps=50, checkpoint_every_tokens=256 * 8)

    def poisoned(start_batch):
        for i, x in enumerate(in_memory_factory(acts, 256)(start_batch), start=start_batch):
            yield x * float("nan") if i == 10 else x

    with pytest.raises(UserError, match=r"loss is nan at step 10 \(token 2560\)"):
        train_sae(cfg, poisoned, D, tmp_path / "run", progress=False)
    last = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert last is not None and last.state["loop"]["step"] == 8
    assert all(torch.isfinite(t).all() for t in last.sae_tensors.values())
    assert not (tmp_path / "run" / "run.json").exists() and not (tmp_path / "run" / "sae").exists()


def _grads(sae) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in sae.named_parameters() if p.grad is not None}


def test_relu_bf16_step_matches_autocast_autograd():
    # independent answer: the objective written as plain autograd under torch.autocast(bf16)
    cfg = _cfg("relu", dtype="bfloat16", l1_coefficient=0.7, l1_warmup_frac=0.0)
    sae = make_sae(SAEConfig("standard", D, 64))
    trainer = make_trainer(sae, cfg)
    trainer.init_weights(torch.Generator().manual_seed(0), torch.randn(D) * 0.3)
    x = sparse_acts(256) * 2
    fused = trainer.fused_loss_and_grads(x, step=0)
    got = _grads(sae)
    assert all(g.dtype == torch.float32 for g in got.values()) and sae.W_enc.dtype == torch.float32
    sae.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
        x_hat = (feats @ sae.W_dec + sae.b_dec).float()
        loss = (x_hat - x).pow(2).sum(-1).mean() + 0.7 * (feats.float() * sae.W_dec.norm(dim=-1)).sum(-1).mean()
    loss.backward()
    assert fused.loss.item() == pytest.approx(loss.item(), rel=2e-2)
    for name, ref in _grads(sae).items():
        err = (got[name] - ref).norm() / ref.norm()
        assert err < 3e-2, (name, float(err))
    # and bf16 really changed the arithmetic (the test can tell fp32 from bf16)
    fp32 = make_trainer(sae, dataclasses.replace(cfg, dtype="float32"))
    assert fp32.fused_loss_and_grads(x, step=0).loss.item() != fused.loss.item()


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_dense_and_csr_kernels_give_the_autograd_gradients(arch):
    k = 5
    sae = make_sae(SAEConfig(arch, D, 64, k=k))
    x, b_dec = torch.randn(32, D), torch.randn(D) * 0.1
    results = {}
    for kernels in ("csr", "dense"):
        cfg = _cfg(arch, k=k, aux_coefficient=0.0, sparse_kernels=kernels)
        trainer = make_trainer(sae, cfg)
        trainer.init_weights(torch.Generator().manual_seed(0), b_dec)
        sae.zero_grad(set_to_none=True)
        out = trainer.loss(x, 0, None)
        out.loss.backward()
        results[kernels] = (out.loss.item(), _grads(sae), out.fire_count_F.sum().item())
    # reference: the dense forward through plain autograd, selection by the same rule
    sae.zero_grad(set_to_none=True)
    pre = sae.pre_acts(x)
    if arch == "topk":
        vals, idx = pre.topk(k, dim=-1)
        feats = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
    else:
        vals, idx = torch.relu(pre).flatten().topk(k * x.shape[0])
        feats = torch.zeros(pre.numel()).index_put((idx,), vals).view_as(pre)
    ref = (sae.decode(feats) - x).pow(2).sum(-1).mean()
    ref.backward()
    for kernels, (loss, grads, fired) in results.items():
        assert loss == pytest.approx(ref.item(), rel=1e-5), kernels
        assert fired == k * x.shape[0]
        for n, p in sae.named_parameters():
            assert torch.allclose(grads[n], p.grad, atol=1e-5, rtol=1e-4), (kernels, n)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_bf16_training_runs_and_learns_like_fp32_on_cpu(tmp_path, arch):
    acts = sparse_acts(4096)
    ev = {}
    for dtype in ("float32", "bfloat16"):
        # b_dec from the geometric median: sparse_acts' constant offset is not learnt from zeros in 30 steps
        cfg = _cfg(arch, dtype=dtype, total_tokens=256 * 30, log_every_steps=29, init_b_dec="geometric_median")
        result = train_sae(cfg, in_memory_factory(acts, 256), D, tmp_path / dtype, progress=False)
        ev[dtype] = result.metrics["explained_variance"]
        manifest = json.loads(result.run_json.read_text())
        assert manifest["numerics"]["compute_dtype"] == dtype and manifest["numerics"]["device"] == "cpu"
        assert manifest["numerics"]["tf32"] is False  # never on a CPU
    assert ev["float32"] > 0.3
    assert abs(ev["bfloat16"] - ev["float32"]) < 0.1, ev


def test_runtime_options_do_not_block_a_resume_but_learning_options_do(tmp_path):
    acts = sparse_acts(4096)
    cfg = _cfg("relu", total_tokens=256 * 12, checkpoint_every_tokens=256 * 4)
    whole = train_sae(cfg, in_memory_factory(acts, 256), D, tmp_path / "whole", progress=False)

    def stop_after(n):
        def source(start_batch):
            for i, x in enumerate(in_memory_factory(acts, 256)(start_batch), start=start_batch):
                if i == n:
                    raise RuntimeError("interrupted")
                yield x
        return source

    with pytest.raises(RuntimeError, match="interrupted"):
        train_sae(cfg, stop_after(6), D, tmp_path / "cut", progress=False)
    with pytest.raises(UserError, match="different config"):
        train_sae(dataclasses.replace(cfg, lr=1e-3), in_memory_factory(acts, 256), D, tmp_path / "cut", progress=False)
    # a checkpoint holds CPU tensors and resumes under other runtime settings
    runtime = dataclasses.replace(cfg, device="cpu", num_threads=1, tf32=False, sparse_kernels="dense")
    resumed = train_sae(runtime, in_memory_factory(acts, 256), D, tmp_path / "cut", progress=False)
    assert resumed.resumed_from_step == 4
    a = load_file(str(whole.sae_dir / "sae_weights.safetensors"))
    b = load_file(str(resumed.sae_dir / "sae_weights.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    again = train_sae(dataclasses.replace(cfg, dtype="bfloat16"), in_memory_factory(acts, 256), D, tmp_path / "cut",
                      progress=False)
    assert again.skipped  # a finished run is found whatever the runtime settings


def test_bad_device_or_dtype_is_one_clear_error(tmp_path):
    acts = sparse_acts(1024)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU.*--device cpu"):
            train_sae(_cfg("relu", device="cuda"), in_memory_factory(acts, 256), D, tmp_path / "a", progress=False)
    with pytest.raises(UserError, match="'tpu'"):
        train_sae(_cfg("relu", device="tpu"), in_memory_factory(acts, 256), D, tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="dtype='float16'"):
        _cfg("relu", dtype="float16")


def _tf32_flags() -> tuple:
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())


def test_resolving_a_cuda_run_leaves_the_process_tf32_flags_alone(monkeypatch):
    monkeypatch.setattr(device_mod, "resolve_device", lambda name: torch.device("cuda", 0))  # a GPU run, faked
    before = _tf32_flags()
    numerics = device_mod.resolve_numerics(_cfg("relu", device="cuda", tf32=True))
    assert numerics.tf32 and _tf32_flags() == before
    assert numerics.to_dict()["float32_matmul_precision"] == "high"  # what the run trains in, not what is set now


@pytest.mark.parametrize("fail", [False, True])
def test_training_sets_tf32_only_while_it_runs(monkeypatch, tmp_path, fail):
    # the loop's numerics are CPU ones here; its precision context gets the CUDA numerics a GPU run would have
    real = device_mod.run_precision
    monkeypatch.setattr(loop_mod, "run_precision",
                        lambda n: real(dataclasses.replace(n, device=torch.device("cuda", 0), tf32=True)))
    acts, seen = sparse_acts(2048), []

    def source(start):
        for i, x in enumerate(in_memory_factory(acts, 256)(start), start=start):
            seen.append(_tf32_flags())
            if fail and i == 5:
                raise RuntimeError("the source broke")
            yield x

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        before = _tf32_flags()
        if fail:
            with pytest.raises(RuntimeError, match="the source broke"):
                train_sae(_cfg("relu", tf32=True), source, D, tmp_path / "run", progress=False)
        else:
            train_sae(_cfg("relu", tf32=True), source, D, tmp_path / "run", progress=False)
        # read on the host first (the scale estimate), then by the loop: TF32 while training
        assert seen[0] == before and seen[-1] == (True, True, "high")
        assert _tf32_flags() == before  # and the process's own settings afterwards
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True  # torch's defaults


def test_precision_context_restores_the_flags_it_found():
    numerics = device_mod.Numerics(torch.device("cuda", 0), torch.float32, False, "dense")
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    try:
        with device_mod.run_precision(numerics):
            assert _tf32_flags() == (False, False, "highest")  # a no-TF32 run computes in full fp32
        assert _tf32_flags() == (True, True, "high")
    finally:
        torch.set_float32_matmul_precision("highest")


def test_cli_rejects_a_bad_dtype_with_a_user_error(tmp_path):  # main() turns it into exit 2
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from sae_transfer.cli import app

    path = tmp_path / "acts.safetensors"
    save_file({"acts": sparse_acts(1024)}, str(path))
    args = ["train", "--acts", str(path), "--d-sae", "32", "--tokens", "1024", "--batch-size", "256",
            "--out", str(tmp_path / "run"), "-q", "--dtype", "float16"]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, UserError) and "dtype='float16'" in str(result.exception)


# ----------------------------------------------------------------------------- CUDA


def _train_steps(cfg: TrainConfig, acts: torch.Tensor, steps: int) -> TrainingRun:
    run = fresh_run(cfg, in_memory_factory(acts, cfg.batch_size), D, None)
    for x in in_memory_factory(acts, cfg.batch_size)(0):
        train_step(run, x)
        if run.state.step == steps:
            break
    return run


@pytest.mark.cuda
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("kernels", ["csr", "dense"])
def test_cuda_steps_equal_cpu_steps(arch, kernels):
    acts = sparse_acts(4096)
    cpu = _train_steps(_cfg(arch, device="cpu", sparse_kernels=kernels), acts, 5)
    gpu = _train_steps(_cfg(arch, device="cuda", tf32=False, sparse_kernels=kernels), acts, 5)
    assert gpu.sae.W_enc.device.type == "cuda" and gpu.numerics.sparse_kernels == kernels
    for name, p in cpu.sae.state_dict().items():
        assert torch.allclose(p, gpu.sae.state_dict()[name].cpu(), atol=1e-4, rtol=1e-3), name


@pytest.mark.cuda
@pytest.mark.parametrize("arch", list(ARCHS))
def test_cuda_bf16_steps_run_with_fp32_master_weights(arch):
    run = _train_steps(_cfg(arch, device="cuda", dtype="bfloat16"), sparse_acts(4096), 5)
    assert all(p.dtype == torch.float32 and p.device.type == "cuda" for p in run.sae.parameters())
    assert all(s["exp_avg"].dtype == torch.float32 for s in run.optimizer.state.values())
    run.nonfinite.check(256)


@pytest.mark.cuda
@pytest.mark.parametrize("first,second", [("cuda", "cpu"), ("cpu", "cuda")])
def test_cuda_checkpoint_resumes_on_the_other_device(tmp_path, first, second):
    acts = sparse_acts(4096)
    cfg = _cfg("topk", total_tokens=256 * 12, checkpoint_every_tokens=256 * 4, tf32=False)
    whole = train_sae(dataclasses.replace(cfg, device="cpu"), in_memory_factory(acts, 256), D, tmp_path / "whole", progress=False)

    def stop_after_6(start_batch):
        for i, x in enumerate(in_memory_factory(acts, 256)(start_batch), start=start_batch):
            if i == 6:
                raise RuntimeError("interrupted")
            yield x

    with pytest.raises(RuntimeError):
        train_sae(dataclasses.replace(cfg, device=first), stop_after_6, D, tmp_path / "cut", progress=False)
    resumed = train_sae(dataclasses.replace(cfg, device=second), in_memory_factory(acts, 256), D, tmp_path / "cut",
                        progress=False)
    assert resumed.resumed_from_step == 4
    assert json.loads(resumed.run_json.read_text())["numerics"]["device"].startswith(second)
    a = load_file(str(whole.sae_dir / "sae_weights.safetensors"))
    b = load_file(str(resumed.sae_dir / "sae_weights.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-3) for k in a)


@pytest.mark.cuda
def test_cuda_source_on_the_gpu_and_saved_sae_round_trip(tmp_path):
    from sae_transfer.sae.io import load_sae

    acts = sparse_acts(4096).cuda()  # in-memory source already on the GPU (index on its device)
    cfg = _cfg("relu", device="cuda")
    result = train_sae(cfg, in_memory_factory(acts, 256), D, tmp_path / "run", progress=False)
    sae = load_sae(result.sae_dir)
    assert sae.W_enc.device.type == "cpu"
    x = acts[:64].cpu()
    assert torch.allclose(sae.cuda()(x.cuda()).cpu(), sae.cpu()(x), atol=1e-5)


@pytest.mark.cuda
def test_cuda_prefetcher_keeps_order_and_raises_at_the_bad_batch():
    from sae_transfer.training.sources import PinnedPrefetcher

    batches = [torch.full((4, 3), float(i)) for i in range(5)]

    def source():
        yield from batches[:3]
        raise UserError("batch 3 is bad")

    it = PinnedPrefetcher(source(), torch.device("cuda"))
    got = [next(it) for _ in range(3)]
    assert all(g.device.type == "cuda" and torch.equal(g.cpu(), b) for g, b in zip(got, batches))
    with pytest.raises(UserError, match="batch 3"):
        next(it)
    it.close()


def test_jumprelu_dense_kernels_give_the_autograd_gradients():
    # the dense threshold gradient (no nonzero(), so no host sync) against the STE autograd graph
    cfg = _cfg("jumprelu", l1_coefficient=0.3, jumprelu_bandwidth=0.5, l1_warmup_frac=0.0, sparse_kernels="dense")
    sae = make_sae(SAEConfig("jumprelu", D, 64))
    trainer = make_trainer(sae, cfg)
    assert trainer.sparse_kernels == "dense"
    trainer.init_weights(torch.Generator().manual_seed(0), torch.randn(D) * 0.3)
    with torch.no_grad():
        sae.threshold.copy_(torch.rand(64) * 0.2 + 0.3)
    x = torch.randn(64, D)
    sae.zero_grad(set_to_none=True)
    ref = trainer.autograd_loss(x, 3)
    ref.loss.backward()
    ref_grads = _grads(sae)
    fused = trainer.fused_loss_and_grads(x, step=3)
    assert fused.loss.item() == pytest.approx(ref.loss.item(), rel=1e-5)
    assert sae.threshold.grad.abs().sum() > 0
    for n, p in sae.named_parameters():
        assert torch.allclose(ref_grads[n], p.grad, atol=1e-5, rtol=1e-4), n
