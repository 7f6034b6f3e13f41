"""The cache on any device: attention implementations, the pipelined device-to-host path,
background-writer failures, float16 range checks; `cuda`-marked tests run where a GPU is."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import sae_transfer.storage.activations_write as write_mod
from sae_transfer.activations import CacheConfig, cache_activations
from sae_transfer.attention import apply_attention, attention_of, check_choice, use_attention
from sae_transfer.corpus import CorpusConfig
from sae_transfer.errors import UserError
from sae_transfer.hook_batches import iter_hook_batches
from sae_transfer.models import load_model
from sae_transfer.storage.activations import MANIFEST, PROGRESS, ActivationDataset
from tests._tiny import tiny_corpus_dir, tiny_model_dir

HOOKS = ("blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre")  # HF hidden_states[0] and [1]


@pytest.fixture(autouse=True)
def _full_fp32_matmuls():
    """CUDA comparisons below are at fp32 tolerances: TF32 (a process-wide switch that training
    turns on) must be off while they run."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("model"), d_model=32, n_layers=2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return CorpusConfig(source=str(tiny_corpus_dir(tmp_path_factory.mktemp("corpus"), n_copies=1)))


def _hf_hidden_states(model_dir, ids_NS, device="cpu", dtype=torch.float32):
    """Hidden states of a plain transformers forward with eager attention (the independent answer)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=dtype).to(device)
    with torch.no_grad():
        return [h.float().cpu() for h in hf(ids_NS.to(device), output_hidden_states=True).hidden_states]


def _scaled_embeddings(src, out, value: float):
    """A copy of the checkpoint at `src` whose token embeddings are all `value`: resid_pre of
    block 0 is then exactly `value` in every element."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        hf.model.embed_tokens.weight.fill_(value)
    hf.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def _cache(model, corpus, out, **kw):
    options = dict(model=str(model), hooks=HOOKS, corpus=corpus, n_tokens=600, context_size=40, batch_tokens=120)
    return cache_activations(CacheConfig(**(options | kw)), out, progress=False)


# -- attention implementations ------------------------------------------------------------

def test_sdpa_runs_sdpa_and_matches_eager(tiny, monkeypatch):
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = torch.randint(3, 300, (3, 24), generator=torch.Generator().manual_seed(0))
    eager = load_model(str(tiny), device="cpu", attn_implementation="eager")
    assert attention_of(eager) == "eager"
    with torch.inference_mode():
        logits_eager = eager(ids, return_type="logits")
    assert not calls  # TransformerLens's own eager attention
    sdpa = load_model(str(tiny), device="cpu", attn_implementation="sdpa")
    assert attention_of(sdpa) == "sdpa"
    with torch.inference_mode():
        logits_sdpa, cache = sdpa.run_with_cache(ids)
    assert len(calls) == 2  # one SDPA call per layer
    assert torch.allclose(logits_sdpa, logits_eager, atol=1e-5, rtol=0)
    assert "blocks.1.hook_resid_pre" in cache and "blocks.1.attn.hook_pattern" not in cache
    # back to eager: bit-identical to the eager load again
    assert use_attention(sdpa, "eager") == "eager"
    with torch.inference_mode():
        assert torch.equal(sdpa(ids, return_type="logits"), logits_eager)


def test_greedy_generation_agrees_across_attention(tiny):
    # rollouts (evals.rollouts) generate with the bridge's components unwrapped (plain_model); the
    # attention choice (use_attention) must not change the greedy tokens
    from sae_transfer.evals.rollouts import plain_model

    model = load_model(str(tiny), device="cpu", attn_implementation="eager")
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        with plain_model(model) as hf:
            want = hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        use_attention(model, "sdpa")
        with plain_model(model) as hf:
            got = hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)


def test_resumed_patched_pass_under_sdpa_matches_eager(tiny):
    # the CE eval's patched passes run the model's own forward from block L on (evals.splice)
    from sae_transfer.evals import splice

    ids = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(4))
    logits = {}
    for impl in ("eager", "sdpa"):
        model = load_model(str(tiny), device="cpu", attn_implementation=impl)
        with torch.inference_mode():
            x_BSD, clean = splice.clean_pass(model, ids, "blocks.1.hook_resid_pre")
            resumed = splice.resume_from_layer(model, x_BSD * 0.5, 1, ids)
            hooked = model.run_with_hooks(ids, return_type="logits",
                                          fwd_hooks=[("blocks.1.hook_resid_pre", lambda a, hook=None: a * 0.5)])
        assert resumed is not None and torch.allclose(resumed, hooked, atol=1e-5, rtol=0)
        logits[impl] = (clean, resumed)
    for a, b in zip(logits["eager"], logits["sdpa"]):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_attention_choice_rules(tiny):
    assert check_choice("auto", HOOKS) == "auto"
    assert check_choice("auto", ["blocks.0.attn.hook_pattern"]) == "eager"
    with pytest.raises(UserError, match="only fire with eager attention"):
        check_choice("sdpa", ["blocks.0.attn.hook_attn_scores"])
    with pytest.raises(UserError, match="attn_implementation 'flash' is not one of auto, eager, sdpa"):
        check_choice("flash")
    model = load_model(str(tiny), device="cpu")
    assert attention_of(model) == "eager"  # auto on CPU
    assert apply_attention(model, "sdpa", "cpu") == "sdpa"


def test_cache_with_sdpa_matches_hf_and_records_it(tmp_path, tiny, corpus):
    records = _cache(tiny, corpus, tmp_path, attn_implementation="sdpa")
    ds = ActivationDataset(records[0].path)
    assert ds.meta["attn_implementation"] == "sdpa" and ds.meta["device"] == "cpu"
    table = ds.read_table()
    full = table.column("seq_id").to_numpy() < 600 // 40
    ids_NS = torch.from_numpy(table.column("token_id").to_numpy()[full].astype(np.int64)).reshape(-1, 40)
    hidden = _hf_hidden_states(tiny, ids_NS)
    for layer, record in enumerate(records):  # block 1's input is block 0's output: SDPA ran there
        ds_l = ActivationDataset(record.path)
        want = hidden[layer].reshape(-1, 32)
        got = ds_l.acts(ds_l.read_table()).float()[torch.from_numpy(full)]
        assert torch.allclose(got, want, atol=1e-5 * float(want.abs().max()), rtol=0)
    default = ActivationDataset(_cache(tiny, corpus, tmp_path / "auto")[0].path)
    assert default.meta["attn_implementation"] == "eager"  # auto on CPU
    assert default.path.name == ds.path.name  # the kernel is provenance, not part of the key


# -- pipelined batches and the background writer ---------------------------------------------

def test_pipelined_batches_equal_synchronous_ones(tiny):
    model = load_model(str(tiny), device="cpu")
    tokens = torch.randint(3, 300, (5, 16), generator=torch.Generator().manual_seed(2))
    sync = list(iter_hook_batches(model, tokens, list(HOOKS), batch_seqs=2, store_dtype=torch.bfloat16))
    piped = [b.wait() for b in iter_hook_batches(model, tokens, list(HOOKS), batch_seqs=2,
                                                 store_dtype=torch.bfloat16, pipelined=True)]
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens)
    for h in HOOKS:
        got = torch.cat([b.acts[h] for b in piped])
        assert torch.equal(got, torch.cat([b.acts[h] for b in sync]))
        assert torch.equal(got, cache[h].to(torch.bfloat16))
        assert torch.allclose(torch.cat([b.norms[h] for b in piped]), cache[h].norm(dim=-1), rtol=1e-5)


def test_writer_failure_surfaces_and_keeps_finished_shards(tmp_path, tiny, corpus, monkeypatch):
    real_append = write_mod.ActivationWriter.append
    calls = {"n": 0}

    def failing_append(self, *args):
        if self.meta["hook"] == HOOKS[1]:
            calls["n"] += 1
            if calls["n"] == 4:
                raise OSError("No space left on device: shard-test")
        return real_append(self, *args)

    monkeypatch.setattr(write_mod.ActivationWriter, "append", failing_append)
    small = dict(batch_tokens=80, shard_bytes=1)  # a shard per batch: three finish before the failure
    with pytest.raises(OSError, match=r"^No space left on device: shard-test$"):
        _cache(tiny, corpus, tmp_path / "failed", **small)
    folder = next((tmp_path / "failed").glob(f"*{HOOKS[1]}*"))
    kept = [json.loads(line) for line in (folder / PROGRESS).read_text().splitlines()]
    assert len(kept) == 3 and not (folder / MANIFEST).exists() and not list(folder.glob(".*.tmp"))
    before = {e["file"]: (folder / e["file"]).read_bytes() for e in kept}
    monkeypatch.setattr(write_mod.ActivationWriter, "append", real_append)
    resumed = _cache(tiny, corpus, tmp_path / "failed", **small)
    assert resumed[1].resumed_rows == 3 * 80
    assert all((folder / name).read_bytes() == data for name, data in before.items())  # not rewritten
    clean = _cache(tiny, corpus, tmp_path / "clean", batch_tokens=200)
    for r, c in zip(resumed, clean):
        assert ActivationDataset(r.path).read_table().equals(ActivationDataset(c.path).read_table())


def test_float16_overflow_is_a_user_error_from_the_writer_thread(tmp_path, tiny, corpus):
    big = _scaled_embeddings(tiny, tmp_path / "big", 7e4)  # > 65504: inf in float16
    with pytest.raises(UserError, match=r"activations of 'blocks.0.hook_resid_pre' exceed the float16 range"):
        _cache(big, corpus, tmp_path / "out", hooks=("blocks.0.hook_resid_pre",), dtype="float16")


def test_large_norm_within_float16_range_is_stored(tmp_path, tiny, corpus):
    # every element 20000 (exact in float16) while the norm, 20000 * sqrt(32) ~ 113k, is not
    wide = _scaled_embeddings(tiny, tmp_path / "wide", 2e4)
    rec = _cache(wide, corpus, tmp_path / "out", hooks=("blocks.0.hook_resid_pre",), dtype="float16")[0]
    ds = ActivationDataset(rec.path)
    table = ds.read_table()
    assert torch.equal(ds.acts(table).float(), torch.full((600, 32), 2e4))
    assert np.allclose(table.column("norm").to_numpy(), 2e4 * 32**0.5, rtol=1e-6)


# -- CUDA -------------------------------------------------------------------------------------

@pytest.mark.cuda
def test_cuda_auto_picks_sdpa_and_matches_hf(tmp_path, tiny, corpus):
    records = _cache(tiny, corpus, tmp_path, device="cuda")
    ds = ActivationDataset(records[0].path)
    assert ds.meta["attn_implementation"] == "sdpa" and ds.meta["device"].startswith("cuda")
    table = ds.read_table()
    full = table.column("seq_id").to_numpy() < 600 // 40
    ids_NS = torch.from_numpy(table.column("token_id").to_numpy()[full].astype(np.int64)).reshape(-1, 40)
    want = _hf_hidden_states(tiny, ids_NS)[1].reshape(-1, 32)
    post = ActivationDataset(records[1].path)
    got = post.acts(post.read_table()).float()[torch.from_numpy(full)]
    assert torch.allclose(got, want, atol=1e-4 * float(want.abs().max()), rtol=0)


@pytest.mark.cuda
def test_cuda_eager_cache_equals_cpu_cache(tmp_path, tiny, corpus):
    cpu = _cache(tiny, corpus, tmp_path / "cpu", device="cpu", attn_implementation="eager")
    gpu = _cache(tiny, corpus, tmp_path / "gpu", device="cuda", attn_implementation="eager")
    for c, g in zip(cpu, gpu):
        assert c.path.name == g.path.name  # same dataset key on either device
        a, b = (ActivationDataset(r.path) for r in (c, g))
        ta, tb = a.read_table(), b.read_table()
        assert ta.select(["seq_id", "pos", "token_id", "role"]).equals(tb.select(["seq_id", "pos", "token_id", "role"]))
        x_cpu, x_gpu = a.acts(ta).float(), b.acts(tb).float()
        assert torch.allclose(x_gpu, x_cpu, atol=1e-5 * float(x_cpu.abs().max()), rtol=0)


@pytest.mark.cuda
def test_cuda_bf16_eager_cache_is_bit_identical_to_hf(tmp_path, tiny, corpus):
    rec = _cache(tiny, corpus, tmp_path, device="cuda", attn_implementation="eager", model_dtype="bfloat16",
                 dtype="bfloat16", hooks=("blocks.1.hook_resid_pre",))[0]
    ds = ActivationDataset(rec.path)
    table = ds.read_table()
    full = table.column("seq_id").to_numpy() < 600 // 40
    ids_NS = torch.from_numpy(table.column("token_id").to_numpy()[full].astype(np.int64)).reshape(-1, 40)
    want = _hf_hidden_states(tiny, ids_NS, "cuda", torch.bfloat16)[1].reshape(-1, 32)
    assert torch.equal(ds.acts(table).float()[torch.from_numpy(full)], want)


@pytest.mark.cuda
def test_cuda_pipelined_batches_use_pinned_buffers(tiny):
    model = load_model(str(tiny), device="cuda")
    tokens = torch.randint(3, 300, (6, 32), generator=torch.Generator().manual_seed(3))
    batches = list(iter_hook_batches(model, tokens, list(HOOKS), batch_seqs=4, pipelined=True))
    assert all(b.ready is not None and b.acts[h].is_pinned() for b in batches for h in HOOKS)
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens.cuda())
    for h in HOOKS:
        got = torch.cat([b.wait().acts[h] for b in batches])
        assert torch.equal(got, cache[h].cpu())


@pytest.mark.cuda
def test_cuda_float16_overflow_still_detected(tmp_path, tiny, corpus):
    big = _scaled_embeddings(tiny, tmp_path / "big", 7e4)
    with pytest.raises(UserError, match="exceed the float16 range"):
        _cache(big, corpus, tmp_path / "out", hooks=("blocks.0.hook_resid_pre",), dtype="float16", device="cuda")


@pytest.mark.cuda
def test_cuda_position_curves_equal_cpu(tiny):
    from sae_transfer.evals.positions import position_curves
    from sae_transfer.sae import ReluSAE, SAEConfig

    torch.manual_seed(0)
    sae = ReluSAE(SAEConfig("standard", 32, 128))
    torch.nn.init.normal_(sae.W_enc, std=32**-0.5)
    tokens = torch.randint(3, 300, (6, 32), generator=torch.Generator().manual_seed(5))
    rows = {}
    for device in ("cpu", "cuda"):
        model = load_model(str(tiny), device=device, attn_implementation="eager")
        rows[device] = position_curves(model, {"s": sae}, tokens, "blocks.1.hook_resid_pre", scale=1.0,
                                       threshold=5.0, batch_tokens=64, device=device)
    assert len(rows["cpu"]) == len(rows["cuda"]) > 0
    for a, b in zip(rows["cpu"], rows["cuda"]):
        assert {k: v for k, v in a.items() if not isinstance(v, float)} == \
            {k: v for k, v in b.items() if not isinstance(v, float)}
        for k, v in a.items():
            if isinstance(v, float) and v == v:
                assert b[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
