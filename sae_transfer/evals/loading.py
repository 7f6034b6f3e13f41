"""SAEs and models for an evaluation: provenance records and pairing checks that fail with a
clear message before any forward pass."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sae_transfer import remote
from sae_transfer.errors import UserError
from sae_transfer.models import layer_of, parse_model_spec
from sae_transfer.sae.io import load_sae
from sae_transfer.storage.fingerprint import sha256_file
from sae_transfer.storage.layout import RunLayout
from sae_transfer.storage.mirror import local_copy

# Hooks whose width is d_model, so an SAE's d_in can be checked from the model config alone.
_RESID_WIDTH = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "hook_in", "hook_out")


@dataclass
class LoadedSAE:
    """An SAE with the provenance columns of every row it produces."""

    sae: object  # sae_transfer.sae.SAE
    info: dict  # sae_id, sae_model, sae_finetuned_from
    context_size: int | None  # training context (cfg metadata), for position curves
    folder: str  # where it was loaded from (for messages)


def weights_hash(folder: Path) -> str:
    """sha256 prefix of the SAE's weights file."""
    return sha256_file(folder / "sae_weights.safetensors")[:12]


def load_saes(folders: list[str], hook: str) -> list[LoadedSAE]:
    """Load every SAE folder, checking it was trained on `hook` (UserError otherwise)."""
    out = []
    for spec in folders:
        folder = Path(local_copy(spec)).expanduser()  # an SAE on an object store: its local mirror
        sae = load_sae(folder, expect_hook=hook)
        meta = sae.cfg.metadata
        run = RunLayout.holding(folder)  # a trainer run's SAE is named by its run folder
        name = run.root.name if run is not None else folder.name
        info = {
            "sae_id": f"{name}:{weights_hash(folder)}",
            "sae_model": meta.get("model_name"),
            "sae_finetuned_from": meta.get("finetuned_from"),
            "sae_variant": meta.get("variant"),
        }
        out.append(LoadedSAE(sae, info, meta.get("context_size"), spec))
    return out


def model_shape(spec: str) -> tuple[int, int, int | None]:
    """(d_model, n_layers, max positions) from a checkpoint's config, without loading weights."""
    if remote.is_remote(spec):  # a model on an object store: its config.json, a few kB
        spec = str(remote.config_copy(spec))
    path = Path(spec).expanduser()
    if (path / "config.json").is_file():
        cfg = json.loads((path / "config.json").read_text())
    elif path.exists() or spec.startswith((".", "/", "~")):
        raise UserError(f"model folder {spec!r} has no config.json: pass a Hugging Face checkpoint folder or a Hub id")
    else:  # a Hub id, maybe `org/name@revision`: read its config.json (cached, or downloaded)
        from huggingface_hub import hf_hub_download  # deferred: the Hub client takes ~0.5 s to import, needed for Hub ids only

        ref = parse_model_spec(spec)
        try:
            cfg = json.loads(Path(hf_hub_download(ref.name, "config.json", revision=ref.revision)).read_text())
        except Exception as exc:  # the Hub client raises many types; the user needs one line
            raise UserError(f"could not read the config of model {spec!r}: "
                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__} "
                            "(check the id and revision; offline runs need the model in the local cache)") from exc
    cfg = cfg.get("text_config", cfg) if "hidden_size" not in cfg else cfg
    d_model = cfg.get("hidden_size") or cfg.get("n_embd") or cfg.get("d_model")
    n_layers = cfg.get("num_hidden_layers") or cfg.get("n_layer")
    return int(d_model), int(n_layers), cfg.get("max_position_embeddings") or cfg.get("n_positions")


def check_pairings(models: list[str], saes: list[LoadedSAE], hook: str) -> None:
    """UserError on a hook past the model's last layer or an SAE width that cannot match."""
    layer = layer_of(hook)
    for spec in models:
        d_model, n_layers, _ = model_shape(spec)
        if layer is not None and layer >= n_layers:
            raise UserError(f"hook {hook!r} needs layer {layer} but {spec} has {n_layers} layers (0..{n_layers - 1}); "
                            "pick another hook")
        if not hook.endswith(_RESID_WIDTH):
            continue
        for loaded in saes:
            if loaded.sae.cfg.d_in != d_model:
                raise UserError(
                    f"SAE {loaded.folder} has d_in={loaded.sae.cfg.d_in} but {spec} has d_model={d_model} at {hook}; "
                    "pick an SAE trained on this model family"
                )


def check_width(d_in: int, saes: list[LoadedSAE], hook: str) -> None:
    """UserError if a hooked activation's measured width differs from an SAE's d_in."""
    for loaded in saes:
        if loaded.sae.cfg.d_in != d_in:
            raise UserError(f"SAE {loaded.folder} has d_in={loaded.sae.cfg.d_in} but {hook} activations have width {d_in}; "
                            "pick a matching SAE")
