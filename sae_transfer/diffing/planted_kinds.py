"""More planted pairs, each a different kind of change, built from `planted`'s base model.

`planted` shrinks the framing tokens' embedding rows so that its plant is a clean chat-only
direction; real fine-tunes also move ordinary tokens with large rows, shift everything, and
turn or stretch directions. Each pair here changes the base model in one known way (all
directions are random unit vectors drawn from the seed; magnitudes are multiples of the
mean embedding-row norm m):

- "token":    chat = base with `token_scale`·m·v added to the embedding row of one ordinary
              frequent token with a large row (among the `token_candidates` most frequent
              non-special tokens of the corpus, the one with the largest row). At
              blocks.0.hook_resid_pre its rows are e_t (base) and e_t + α·v (chat).
- "dense":    both models get zero MLP biases (function unchanged); chat's layer-0 MLP output
              bias is `dense_scale`·m·c, so blocks.1.hook_resid_pre is base + c at every position.
- "rotation": every embedding row rotated by `rotation_degrees` in the plane span(a, b).
- "rescaled": every embedding row's component along u multiplied by `rescale` (norm only).

The identical control is `planted`'s "control" pair. `PlantedKind.truth` holds the planted
unit direction(s) in model units; `token_ids` the planted token (kind "token" only).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sae_transfer.diffing.planted import PlantedSet

KINDS_RECORD = "kinds.json"
KINDS_VERSION = 1  # bump when a change here changes the built models


@dataclass(frozen=True)
class KindsConfig:
    """Magnitudes of the planted kinds (multiples of the mean embedding-row norm m)."""

    token_scale: float = 2.0  # ‖α·v‖ / m on the one token's row
    token_candidates: int = 12  # the planted token is the largest-row one of this many most frequent tokens
    dense_scale: float = 0.5  # ‖c‖ / m added at every position of layer 1's input
    rotation_degrees: float = 60.0  # angle of the rotation in span(a, b)
    rescale: float = 3.0  # every row's component along u × this

    def hash(self, base_hash: str) -> str:
        """sha256 (16 hex chars) of this config, KINDS_VERSION and the base set's hash."""
        payload = json.dumps({"version": KINDS_VERSION, "base": base_hash, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PlantedKind:
    """One planted pair of a given kind and what differs."""

    name: str  # "token", "dense", "rotation" or "rescaled"
    base: Path  # Hugging Face folder of the base model
    chat: Path  # Hugging Face folder of the chat model
    hook: str  # where the change is exactly what `truth` says
    truth: tuple[tuple[float, ...], ...]  # planted unit direction(s) [D] (rotation: the plane's two)
    magnitude: float  # ‖planted vector‖ (token, dense), the angle in degrees (rotation), the factor (rescaled)
    token_ids: tuple[int, ...] = ()  # kind "token": the planted token

    def truth_KD(self) -> torch.Tensor:
        """The planted direction(s) as float32 [K, D]."""
        return torch.tensor(self.truth, dtype=torch.float32)


def build_kinds(pset: PlantedSet, cfg: KindsConfig = KindsConfig()) -> dict[str, PlantedKind]:
    """Build (or find, same config and base) the planted kinds under `pset.root / "kinds"`."""
    out = pset.root / "kinds"
    key = cfg.hash(pset.config_hash)
    if (out / KINDS_RECORD).is_file():
        rec = json.loads((out / KINDS_RECORD).read_text())
        if rec.get("hash") == key:
            return _load(out, rec)
    from transformers import AutoTokenizer, LlamaForCausalLM  # deferred: transformers takes seconds to import

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    base_dir = pset.pairs["control"].base
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = LlamaForCausalLM.from_pretrained(base_dir).eval()
    emb_VD = base.get_input_embeddings().weight.detach()
    m = float(emb_VD.norm(dim=-1).mean())
    gen = torch.Generator().manual_seed(pset.config.seed + 10)
    v, c, a, b, u = _orthonormal(emb_VD.shape[1], 5, gen)
    token = _planted_token(pset, tokenizer, emb_VD, cfg.token_candidates)
    kinds = {}
    rows = emb_VD.clone()
    rows[token] += cfg.token_scale * m * v
    kinds["token"] = _with_rows(base, tokenizer, rows, out, "token", "blocks.0.hook_resid_pre", (v,),
                                cfg.token_scale * m, (token,))
    theta = math.radians(cfg.rotation_degrees)
    ca, cb = emb_VD @ a, emb_VD @ b  # rotate each row's (a, b) coordinates by theta
    rows = emb_VD + torch.outer(ca * (math.cos(theta) - 1) - cb * math.sin(theta), a) + \
        torch.outer(ca * math.sin(theta) + cb * (math.cos(theta) - 1), b)
    kinds["rotation"] = _with_rows(base, tokenizer, rows, out, "rotation", "blocks.0.hook_resid_pre", (a, b),
                                   cfg.rotation_degrees)
    rows = emb_VD + (cfg.rescale - 1) * torch.outer(emb_VD @ u, u)
    kinds["rescaled"] = _with_rows(base, tokenizer, rows, out, "rescaled", "blocks.0.hook_resid_pre", (u,), cfg.rescale)
    kinds["dense"] = _dense(base, tokenizer, out, cfg.dense_scale * m * c)
    record = {"hash": key, "config": asdict(cfg), "kinds": {name: _kind_json(k, out) for name, k in kinds.items()}}
    tmp = out / (KINDS_RECORD + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(out / KINDS_RECORD)
    return _load(out, record)


def _orthonormal(d: int, n: int, gen: torch.Generator) -> list[torch.Tensor]:
    """n random orthonormal directions [D] (QR of a Gaussian draw)."""
    q, _ = torch.linalg.qr(torch.randn(d, n, generator=gen))
    return [q[:, i].contiguous() for i in range(n)]


def _planted_token(pset: PlantedSet, tokenizer, emb_VD: torch.Tensor, candidates: int) -> int:
    """Among the `candidates` most frequent non-special tokens of the corpus, the largest row."""
    special = set(tokenizer.all_special_ids)
    counts: Counter[int] = Counter()
    for line in pset.corpus.read_text(encoding="utf-8").splitlines():
        counts.update(t for t in tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"] if t not in special)
    frequent = [t for t, _ in counts.most_common(candidates)]
    return max(frequent, key=lambda t: float(emb_VD[t].norm()))


def _with_rows(base, tokenizer, rows_VD, out: Path, name: str, hook: str, truth, magnitude: float,
               token_ids: tuple[int, ...] = ()) -> PlantedKind:
    """A copy of `base` with embedding rows `rows_VD`, saved as out/<name>-chat."""
    import copy

    chat = copy.deepcopy(base)
    with torch.no_grad():
        chat.get_input_embeddings().weight.copy_(rows_VD)
    _save(chat, tokenizer, out / f"{name}-chat")
    base_dir = out / "base"
    if not base_dir.exists():
        _save(base, tokenizer, base_dir)
    return PlantedKind(name, base_dir, out / f"{name}-chat", hook, tuple(tuple(float(x) for x in t) for t in truth),
                       float(magnitude), token_ids)


def _dense(base, tokenizer, out: Path, shift_D: torch.Tensor) -> PlantedKind:
    """Base and chat with zero MLP biases; chat's layer-0 MLP output bias is `shift_D`."""
    from transformers import LlamaForCausalLM

    config = base.config.to_dict()
    config["mlp_bias"] = True
    cls_config = type(base.config).from_dict(config)
    pair = []
    for bias in (torch.zeros_like(shift_D), shift_D):
        model = LlamaForCausalLM(cls_config).eval()
        missing = model.load_state_dict(base.state_dict(), strict=False).missing_keys
        assert all(k.endswith(".bias") for k in missing), missing
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.zero_()
            model.model.layers[0].mlp.down_proj.bias.copy_(bias)
        pair.append(model)
    _save(pair[0], tokenizer, out / "dense-base")
    _save(pair[1], tokenizer, out / "dense-chat")
    norm = float(shift_D.norm())
    return PlantedKind("dense", out / "dense-base", out / "dense-chat", "blocks.1.hook_resid_pre",
                       (tuple(float(x) for x in shift_D / norm),), norm)


def _kind_json(k: PlantedKind, out: Path) -> dict:
    return {"base": k.base.name, "chat": k.chat.name, "hook": k.hook, "truth": [list(t) for t in k.truth],
            "magnitude": k.magnitude, "token_ids": list(k.token_ids)}


def _load(out: Path, rec: dict) -> dict[str, PlantedKind]:
    return {name: PlantedKind(name, out / k["base"], out / k["chat"], k["hook"], tuple(tuple(t) for t in k["truth"]),
                              float(k["magnitude"]), tuple(k["token_ids"])) for name, k in rec["kinds"].items()}


def _save(model, tokenizer, dest: Path) -> None:
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
