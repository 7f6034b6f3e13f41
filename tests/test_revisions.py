"""Hub revisions end to end, offline: `org/name@rev` specs, the pair's configured revisions,
and `trust_remote_code`, through the real loading code and a local stand-in for the Hub."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from sae_transfer.errors import UserError
from sae_transfer.models import ModelRef, load_model, model_identity, parse_model_spec
from sae_transfer.sae.io import save_sae
from sae_transfer.study import PairConfig, parse_study
from tests._hub import fake_hub_cache
from tests._tiny import tiny_corpus_dir, tiny_model_dir
from tests.test_evals_metrics import lossless_sae

HOOK = "blocks.1.hook_resid_pre"
REPO = "org/tiny"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Repo `org/tiny`: branch main = seed-0 weights, branch step-50 = seed-1 weights."""
    import huggingface_hub.constants as hub_constants

    root = tmp_path_factory.mktemp("hub")
    main, step50 = tiny_model_dir(root, name="main", seed=0), tiny_model_dir(root, name="step-50", seed=1)
    commits = fake_hub_cache(root / "cache", REPO, {"main": main, "step-50": step50})
    sae = save_sae(lossless_sae(32), root / "sae", metadata={"model_name": REPO, "hook_name": HOOK, "context_size": 32})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hub_constants, "HF_HUB_CACHE", str(root / "cache"))
        yield {"root": root, "main": main, "step50": step50, "commits": commits, "sae": str(sae),
               "corpus": str(tiny_corpus_dir(root))}


def test_spec_splits_at_the_revision_but_never_a_local_folder(tmp_path):
    assert parse_model_spec("org/name@step-5") == ModelRef("org/name", "step-5")
    assert parse_model_spec("org/name", "v1") == ModelRef("org/name", "v1")
    assert parse_model_spec("org/name@v1", "v1").spec == "org/name@v1"
    folder = tmp_path / "run@3"
    folder.mkdir()
    assert parse_model_spec(str(folder)) == ModelRef(str(folder), None)
    assert ModelRef(str(folder), "v1").spec == str(folder)  # a folder has no revisions
    with pytest.raises(UserError, match="also given"):
        parse_model_spec("org/name@v1", "v2")
    with pytest.raises(UserError, match="org/name@revision"):
        parse_model_spec("org/name@")
    assert model_identity("org/name@abc") == {"model_id": "org/name", "model_revision": "abc"}


def _weight(model) -> torch.Tensor:
    return model.original_model.model.layers[0].mlp.down_proj.weight.detach()


def test_hub_spec_loads_that_revision(hub):
    on_disk = load_file(str(hub["step50"] / "model.safetensors"))["model.layers.0.mlp.down_proj.weight"]
    at_rev = load_model(f"{REPO}@step-50", device="cpu")
    torch.testing.assert_close(_weight(at_rev), on_disk, rtol=0, atol=0)
    main = load_model(REPO, device="cpu")
    assert not torch.equal(_weight(main), on_disk)
    by_commit = load_model(REPO, revision=hub["commits"]["step-50"], device="cpu")
    torch.testing.assert_close(_weight(by_commit), on_disk, rtol=0, atol=0)


def _evaluate(model: str, hub):
    from sae_transfer.evals.api import evaluate_transfer
    from sae_transfer.study import parse_study

    settings = parse_study({"corpus": {"source": str(hub["corpus"])}, "eval": {"tokens": 128, "bootstrap": 10},
                            "outliers": {"threshold": 1e9}, "device": "cpu"}).eval_settings
    rows = evaluate_transfer([hub["sae"]], model, HOOK, settings)["metrics"]
    return {r["outlier_policy"]: r for r in rows}


def test_pair_revision_reaches_the_evaluation(hub):
    from sae_transfer.tasks.models import prepare_pair

    pair = PairConfig(base=REPO, chat=REPO, base_revision="step-50", checkpoints=None, build_demo=False)
    record = prepare_pair.fn(pair)
    assert record.base == f"{REPO}@step-50" and record.chat == REPO
    got = _evaluate(record.base, hub)["included"]
    assert (got["model_id"], got["model_revision"]) == (REPO, "step-50")  # was "main": loaded without a revision
    # the weights evaluated are step-50's: same clean loss as the plain folder it was published from
    assert got["ce_clean"] == pytest.approx(_evaluate(str(hub["step50"]), hub)["included"]["ce_clean"], abs=1e-6)
    assert got["ce_clean"] != pytest.approx(_evaluate(REPO, hub)["included"]["ce_clean"], abs=1e-4)


def test_trust_remote_code_reaches_the_loader(hub, monkeypatch):
    from transformer_lens.model_bridge import TransformerBridge

    from sae_transfer.activations import CacheConfig, cache_activations
    from sae_transfer.corpus import CorpusConfig

    seen = []
    real = TransformerBridge.boot_transformers

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(*args, **kwargs)

    monkeypatch.setattr(TransformerBridge, "boot_transformers", spy)
    cfg = parse_study({"pair": {"base": REPO, "chat": REPO, "trust_remote_code": True, "checkpoints": None,
                                "build_demo": False}, "hooks": [HOOK], "corpus": {"source": hub["corpus"]},
                       "eval": {"tokens": 128, "bootstrap": 10}, "outliers": {"threshold": 1e9}, "device": "cpu"})
    from sae_transfer.evals.api import evaluate_transfer

    evaluate_transfer([hub["sae"]], REPO, HOOK, cfg.eval_settings)
    cache_activations(CacheConfig(model=REPO, hooks=(HOOK,), corpus=CorpusConfig(source=hub["corpus"]), n_tokens=64,
                                  context_size=32, device="cpu", trust_remote_code=True), hub["root"] / "acts", progress=False)
    assert seen == [True, True]
