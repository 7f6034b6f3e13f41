"""Load causal LMs through TransformerLens 4 `TransformerBridge` and check hook names."""

from __future__ import annotations

import difflib
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError

from sae_transfer import remote
from sae_transfer.attention import apply_attention
from sae_transfer.errors import UserError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_device() -> str:
    """CUDA when available, else CPU: every compute step takes this unless told otherwise."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str | None) -> str:
    """`device` (None: the default) after checking it names a torch device this machine has;
    UserError naming the fix otherwise, before any weights are read. The one device check:
    training (`training.device`) and every evaluation command go through it."""
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"device {device!r} is not a torch device: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r} but this machine has no CUDA GPU (torch {torch.__version__}): use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"device {device!r} but only {torch.cuda.device_count()} CUDA device(s) exist: use cuda:0..")
    return device


def _looks_local(spec: str) -> bool:
    """A path, not a Hub id: explicit path syntax, an existing path, more slashes than
    `org/name` has, or a first component that is a local folder (`artifacts/demo/base`). A URL on an
    object store is not local: like a Hub id, it is pinned to a revision (`remote.pin`)."""
    if remote.is_remote(spec):
        return False
    path = Path(spec).expanduser()
    if spec.startswith((".", "/", "~", "\\")) or path.exists() or spec.count("/") > 1:
        return True
    return len(path.parts) > 1 and Path(path.parts[0]).is_dir()


def is_local(spec: str) -> bool:
    """True when `spec` names a local checkpoint folder (existing or not), False for a Hub id
    (with or without `@revision`)."""
    return _looks_local(spec)


@dataclass(frozen=True)
class ModelRef:
    """A model to load: where it lives and which revision of it."""

    name: str  # local Hugging Face folder or Hub id, without any `@revision`
    revision: str | None = None  # Hub branch, tag or commit; None: the default branch (or a local folder)

    @property
    def spec(self) -> str:
        """The one-string form, `org/name@revision` (or just the name), that `parse_model_spec` reads."""
        return f"{self.name}@{self.revision}" if self.revision and not _looks_local(self.name) else self.name


def parse_model_spec(spec: str, revision: str | None = None) -> ModelRef:
    """`org/name@rev` -> ModelRef("org/name", "rev"), the one place a spec's `@` is split.

    Local folders are never split (a folder name may contain `@`). `revision`, when given,
    must agree with the spec's own `@rev` (UserError otherwise). A store URL's revision is its
    content fingerprint (`s3://b/m@<16 hex>`, `remote.split_pin`)."""
    if remote.is_remote(spec):
        url, fp = remote.split_pin(spec)
        return ModelRef(url, fp or revision)
    if _looks_local(spec) or "@" not in spec:
        return ModelRef(spec, revision)
    name, _, rev = spec.rpartition("@")
    if not name or not rev:
        raise UserError(f"model {spec!r}: write a Hub revision as org/name@revision (branch, tag or commit)")
    if revision is not None and revision != rev:
        raise UserError(f"model {spec!r} names revision {rev!r} but revision {revision!r} was also given: pass one")
    return ModelRef(name, rev)


def load_model(
    spec: str,
    *,
    revision: str | None = None,
    device: str | None = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    attn_implementation: str = "auto",
):
    """Boot `spec` (a local Hugging Face checkpoint folder, a Hub id, or `org/name@revision`)
    as a TransformerBridge. `trust_remote_code` lets a Hub repo's own modelling code run.
    `attn_implementation`: auto (SDPA on CUDA where the model allows, else eager), eager or sdpa
    (see `sae_transfer.attention`; `attention_of(bridge)` says which one runs).

    Returns the bridge in eval mode. Nothing is downloaded unless `spec` is a Hub id that is
    not already in the local Hugging Face cache.
    """
    from transformer_lens.model_bridge import TransformerBridge

    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    ref = parse_model_spec(spec, revision)
    if remote.is_remote(ref.name):  # this machine's copy, fetched once per content (remote.fetch)
        spec = str(remote.fetch(ref.spec).path)
        ref = ModelRef(spec)
    name, revision, device = ref.name, ref.revision, check_device(device)
    if _looks_local(spec):
        path = Path(spec).expanduser()
        if not path.exists():
            raise UserError(
                f"model folder {spec!r} does not exist: pass an existing Hugging Face checkpoint folder "
                "(build the offline demo pair with `sae-transfer demo-models`) or a Hub id"
            )
        if not (path / "config.json").is_file():
            raise UserError(
                f"model folder {spec!r} has no config.json: pass a Hugging Face checkpoint "
                "folder (save_pretrained output) or a Hub id such as Qwen/Qwen1.5-0.5B"
            )
        name = str(path.resolve())
    try:
        bridge = TransformerBridge.boot_transformers(
            name, device=device, dtype=DTYPES[dtype], revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, SafetensorError, StrictDataclassError) as exc:  # StrictDataclassError: a bad config.json
        if "supported architecture" in str(exc):  # TransformerLens has no adapter for this family
            raise UserError(_unsupported_family(spec, str(exc))) from exc
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"could not load model {name!r}"
            + (f" at revision {revision!r}" if revision else "")
            + f": {first} (check the id or path, and re-download or re-save a damaged checkpoint; "
            "offline runs need the model on disk)"
        ) from exc
    bridge.eval()
    check_family(bridge, spec)
    align_bos(bridge)
    apply_attention(bridge, attn_implementation, device or default_device())
    return bridge


def align_bos(bridge) -> None:
    """Give a tokenizer without a BOS token the BOS its model's config names.

    TransformerLens makes a tokenizer's eos its BOS when it has none. Qwen1.5 has no BOS token and
    its chat models end turns with <|im_end|>, so the base model would get <|endoftext|> at position
    0 and the chat model <|im_end|>: every sequence of the pair would differ at its first token
    (paired crosscoder caches are refused) and the chat model would read a turn end where its base
    read a document start. Both configs say bos_token_id 151643 (<|endoftext|>): use that. A tokenizer
    with its own BOS token, or a config with none, is left alone."""
    tok = getattr(bridge, "tokenizer", None)
    config = getattr(getattr(bridge, "original_model", None), "config", None)
    bos_id = getattr(config, "bos_token_id", None)
    if tok is None or not isinstance(bos_id, int) or tok.bos_token_id == bos_id:
        return
    if tok.bos_token != tok.eos_token or not 0 <= bos_id < len(tok):  # its own BOS, or an id outside the vocabulary
        return
    tok.bos_token = tok.convert_ids_to_tokens(bos_id)
    log.info("tokenizer has no BOS token: using the model config's bos_token_id %d (%s)", bos_id, tok.bos_token)


def hook_names(model) -> list[str]:
    """All hook point names the loaded model serves, sorted."""
    return sorted(model.hook_dict.keys())


def check_hooks(model, hooks: list[str]) -> None:
    """Raise UserError naming close valid hooks if any of `hooks` is not served by `model`."""
    valid = set(model.hook_dict.keys())
    for hook in hooks:
        if hook not in valid:
            close = difflib.get_close_matches(hook, sorted(valid), n=5, cutoff=0.5)
            hint = ", ".join(close) if close else ", ".join(sorted(valid)[:5])
            raise UserError(f"model has no hook {hook!r}; close valid names: {hint}")


def layer_of(hook: str) -> int | None:
    """Block index in a hook name such as `blocks.6.hook_resid_pre`, else None."""
    parts = hook.split(".")
    if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1])
    return None


_FULL_HASH_LIMIT = 64 << 20  # files above 64 MiB are fingerprinted by size + head + tail


def weights_fingerprint(model_dir: str | Path) -> str:
    """sha256 (hex, 16 chars) over a local checkpoint's weight and config files.

    Small files are hashed whole; large ones (7B shards) by size plus their first and last
    4 MiB, which changes whenever a fine-tune rewrites them and costs milliseconds.
    """
    path = Path(model_dir)
    digest = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.suffix in {".safetensors", ".bin", ".json"})
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with file.open("rb") as fh:
            if size <= _FULL_HASH_LIMIT:
                digest.update(fh.read())
            else:
                digest.update(fh.read(4 << 20))
                fh.seek(size - (4 << 20))
                digest.update(fh.read())
    return digest.hexdigest()[:16]


def model_identity(spec: str, revision: str | None = None) -> dict[str, str]:
    """Provenance of a model: its id (without `@revision`), and the revision (Hub: the spec's
    `@rev`, else `revision`, else "main") or weight hash (local folder)."""
    if _looks_local(spec) and Path(spec).expanduser().is_dir():
        return {"model_id": spec, "model_revision": "sha256:" + weights_fingerprint(Path(spec).expanduser())}
    ref = parse_model_spec(spec, revision)
    return {"model_id": ref.name, "model_revision": ref.revision or "main"}


STUDY_FAMILIES = "llama, mistral, qwen2, gemma, gemma2, gpt2"  # tested end to end in tests/test_families.py


def _unsupported_family(spec: str, message: str) -> str:
    """One line naming the family TransformerLens refused (its own message lists every adapter)."""
    family = re.search(r"Model type: ([\w.-]+)", message)
    arch = re.search(r"Config architectures: \[([^\]]*)\]", message)
    names = arch.group(1).replace("'", "") if arch else ""
    what = (family.group(1) if family else "unknown") + (f" ({names})" if names else "")
    return (f"model {spec!r} is a {what} model, which TransformerLens 4 cannot load: "
            f"use a supported causal LM (the study's families: {STUDY_FAMILIES})")


def check_family(bridge, spec: str) -> None:
    """UserError naming the family unless `bridge` is a decoder-only causal LM: every metric here
    is a next-token loss, which encoders, encoder-decoders and audio/vision models do not give."""
    hf = getattr(bridge, "original_model", None)
    hf_cfg = getattr(hf, "config", None)
    causal = (
        not getattr(hf_cfg, "is_encoder_decoder", False)
        and getattr(bridge.cfg, "attention_dir", "causal") == "causal"
        and not any(getattr(bridge.cfg, flag, False) for flag in ("is_audio_model", "is_visual_model"))
    )
    if not causal:
        raise UserError(
            f"model {spec!r} is a {getattr(hf_cfg, 'model_type', 'unknown')} model ({type(hf).__name__}), not a "
            f"decoder-only causal LM: the study needs next-token logits (its families: {STUDY_FAMILIES})")
