"""A tiny base/chat pair whose difference is known, to check the diffing methods against.

The base model is a random-weight Llama-style model (no training: the methods only need
activations with structure, not a good language model) with the project's chat tokenizer
(role tokens, chat template). Its embedding rows are sparse sums of a few of `n_features`
random directions (superposition: more features than d_model), so the residual stream has
the sparse structure dictionaries are built for; with dense random rows every dictionary is
a dense approximation and nothing, planted or not, is identifiable. Three pairs share it:

- "added":   chat = base with `added_scale` × (mean embedding-row norm) · v added to the
             embedding rows of the chat template's framing tokens (<|user|>, <|assistant|>,
             <|end|>). A residual-stream hook sees +α·v at exactly those positions in
             blocks.0.hook_resid_pre (Llama adds no positional embedding), and the pushed
             embedding in every later block's input at those positions.
- "removed": base = base with β·u added to the same rows; chat = the plain base model. A
             direction the base model has and the chat model lost.
- "control": chat = a byte-identical copy of the base model (nothing changed).

The base model's framing-token embedding rows are shrunk (`framing_row_scale`), as the rows
of special tokens a base model never trained on are in real checkpoints (near their small
init). Otherwise each framing token's own large random row dominates its activation and the
cheapest dictionary is one latent per token with both decoders (base row, base row + α·v),
not a chat-only latent for v: the planted concept would be unidentifiable, not missed.

v and u are random unit vectors (u orthogonal to v) drawn from the seed. The corpus is chat
transcripts (docstring as user turn, function as assistant turn) rendered with the chat
template, as a .jsonl usable as `CorpusConfig(source=...)`: the framing tokens appear in the
token stream as their special-token ids. "Planted positions" are the rows whose token id is
one of `PlantedPair.token_ids` (`planted_mask`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import sysconfig
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sae_transfer.chat_pairs import BOS
from sae_transfer.corpus import CorpusConfig
from sae_transfer.demo.chat import instruction_pairs
from sae_transfer.demo.config import DemoPairConfig
from sae_transfer.demo.tokenizer import chat_messages, special_ids, train_tokenizer

PLANTED_RECORD = "planted.json"
BUILD_VERSION = 4  # bump when a change here changes the built models or corpus

# A few stdlib modules with docstring'd functions: a few hundred short chat transcripts.
SOURCE_FILES = ("textwrap.py", "bisect.py", "heapq.py", "colorsys.py", "shlex.py", "fnmatch.py",
                "calendar.py", "string.py", "glob.py", "posixpath.py", "base64.py", "quopri.py")


@dataclass(frozen=True)
class PlantedConfig:
    """Sizes and planted magnitudes of the planted pairs (defaults build in a few seconds)."""

    d_model: int = 32  # residual width
    n_layers: int = 2  # blocks
    n_heads: int = 4  # attention heads (2 key/value heads)
    vocab_size: int = 512  # BPE vocabulary incl. the chat special tokens
    seed: int = 0  # weights, v, u
    added_scale: float = 1.0  # ‖α·v‖ / mean embedding-row norm, for the "added" pair
    removed_scale: float = 1.0  # ‖β·u‖ / mean embedding-row norm, for the "removed" pair
    framing_row_scale: float = 0.1  # base's framing-token embedding rows × this (see module doc)
    n_features: int = 64  # embedding rows are sparse sums of this many unit "feature" directions
    features_per_token: int = 3  # features summed into each embedding row (weights ±U(0.5, 1.5))
    max_docstring_chars: int = 400  # user turns longer than this are dropped
    max_response_chars: int = 800  # assistant turns longer than this are dropped

    def hash(self) -> str:
        """sha256 (16 hex chars) of the config and BUILD_VERSION: the cache key of a build."""
        payload = json.dumps({"build_version": BUILD_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PlantedPair:
    """One (base, chat) pair and what differs between them."""

    name: str  # "added", "removed" or "control"
    base: Path  # Hugging Face folder of the base model
    chat: Path  # Hugging Face folder of the chat model
    side: str | None  # "chat": only chat has the direction; "base": only base has it; None: identical
    direction: tuple[float, ...] | None  # the planted unit vector [D] (model units), None for control
    magnitude: float  # ‖planted vector‖ in model units (0 for control)
    token_ids: tuple[int, ...]  # tokens whose embedding row carries it (the planted positions)

    def direction_D(self) -> torch.Tensor:
        """The planted unit direction as a float32 tensor [D]."""
        if self.direction is None:
            raise ValueError(f"pair {self.name!r} has no planted direction")
        return torch.tensor(self.direction, dtype=torch.float32)


@dataclass(frozen=True)
class PlantedSet:
    """Everything `build_planted` made under one folder."""

    root: Path  # the folder
    corpus: Path  # .jsonl of chat transcripts ({"text": ...} per line)
    config: PlantedConfig  # what was built
    pairs: dict[str, PlantedPair] = field(default_factory=dict)  # by name
    mean_embedding_norm: float = 0.0  # mean ‖embedding row‖ of the base model (model units)
    n_transcripts: int = 0  # lines in the corpus
    config_hash: str = ""  # PlantedConfig.hash() recorded at build time (with its BUILD_VERSION)


def planted_mask(token_ids_N: torch.Tensor, pair: PlantedPair) -> torch.Tensor:
    """Bool [N]: the rows whose token id is one of the pair's planted tokens."""
    return torch.isin(token_ids_N, torch.tensor(pair.token_ids, dtype=token_ids_N.dtype))


def build_planted(out: str | Path, cfg: PlantedConfig = PlantedConfig()) -> PlantedSet:
    """Build (or find already built, same config) the planted pairs under `out`; returns them."""
    out = Path(out)
    found = load_planted(out)
    if found is not None and found.config_hash == cfg.hash():
        return found
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    transcripts, tokenizer = _corpus_and_tokenizer(out, cfg)
    corpus = out / "chat_transcripts.jsonl"
    with corpus.open("w", encoding="utf-8") as fh:
        for text in transcripts:
            fh.write(json.dumps({"text": text}) + "\n")
    model = _random_llama(cfg, tokenizer)
    framing = _framing_ids(tokenizer)
    with torch.no_grad():
        emb_VD = model.get_input_embeddings().weight
        emb_VD.copy_(_sparse_feature_rows(cfg, emb_VD.shape[0], float(emb_VD.norm(dim=-1).mean())))
        emb_VD[list(framing)] *= cfg.framing_row_scale
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    v_D = torch.nn.functional.normalize(torch.randn(cfg.d_model, generator=gen), dim=0)
    u_D = torch.randn(cfg.d_model, generator=gen)
    u_D = torch.nn.functional.normalize(u_D - (u_D @ v_D) * v_D, dim=0)
    emb_VD = model.get_input_embeddings().weight
    mean_norm = float(emb_VD.detach().norm(dim=-1).mean())
    alpha, beta = cfg.added_scale * mean_norm, cfg.removed_scale * mean_norm
    _save(model, tokenizer, out / "base")
    _save(_with_planted(model, framing, alpha * v_D), tokenizer, out / "chat-added")
    _save(_with_planted(model, framing, beta * u_D), tokenizer, out / "base-removed")
    shutil.copytree(out / "base", out / "control-chat")
    record = {
        "config": asdict(cfg), "config_hash": cfg.hash(), "corpus": corpus.name, "n_transcripts": len(transcripts),
        "mean_embedding_norm": mean_norm,
        "pairs": {
            "added": _pair_json("base", "chat-added", "chat", v_D, alpha, framing),
            "removed": _pair_json("base-removed", "base", "base", u_D, beta, framing),
            "control": _pair_json("base", "control-chat", None, None, 0.0, ()),
        },
    }
    tmp = out / (PLANTED_RECORD + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(out / PLANTED_RECORD)
    return load_planted(out)


def load_planted(out: str | Path) -> PlantedSet | None:
    """The PlantedSet recorded under `out`, or None when nothing complete is there."""
    out = Path(out)
    path = out / PLANTED_RECORD
    if not path.is_file():
        return None
    rec = json.loads(path.read_text())
    known = {f for f in PlantedConfig.__dataclass_fields__}
    pairs = {
        name: PlantedPair(
            name=name, base=out / p["base"], chat=out / p["chat"], side=p["side"],
            direction=tuple(p["direction"]) if p["direction"] is not None else None,
            magnitude=float(p["magnitude"]), token_ids=tuple(p["token_ids"]),
        )
        for name, p in rec["pairs"].items()
    }
    cfg = PlantedConfig(**{k: v for k, v in rec["config"].items() if k in known})
    return PlantedSet(out, out / rec["corpus"], cfg, pairs, float(rec["mean_embedding_norm"]),
                      int(rec["n_transcripts"]), rec["config_hash"])


def _pair_json(base: str, chat: str, side, direction_D, magnitude: float, token_ids) -> dict:
    return {
        "base": base, "chat": chat, "side": side,
        "direction": None if direction_D is None else [float(x) for x in direction_D],
        "magnitude": float(magnitude), "token_ids": [int(t) for t in token_ids],
    }


def _framing_ids(tokenizer) -> tuple[int, ...]:
    """Ids of the chat template's framing tokens that occur in transcripts."""
    sp = special_ids(tokenizer)
    return tuple(sorted({sp["user"], sp["assistant"], sp["end"]}))


def _corpus_and_tokenizer(out: Path, cfg: PlantedConfig):
    """(chat transcripts without the leading BOS, the trained chat tokenizer)."""
    src = out / "source"
    src.mkdir()
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for name in SOURCE_FILES:
        if (root / name).is_file():
            text = (root / name).read_text(encoding="utf-8")
            (src / name).write_text(text, encoding="utf-8")
            texts.append(text)
    demo_cfg = DemoPairConfig(max_docstring_chars=cfg.max_docstring_chars, chat_context_size=cfg.max_response_chars // 4)
    pairs = instruction_pairs("train", demo_cfg, corpus=CorpusConfig(source=str(src), eval_fraction=0.0))
    tokenizer = train_tokenizer(texts, cfg.vocab_size)
    transcripts = []
    for p in pairs:
        text = tokenizer.apply_chat_template(chat_messages(p.prompt, p.response), tokenize=False)
        transcripts.append(text[len(BOS):] if text.startswith(BOS) else text)
    shutil.rmtree(src)
    return transcripts, tokenizer


def _random_llama(cfg: PlantedConfig, tokenizer):
    """A random-weight Llama (seeded) with untied embeddings, so planting leaves the unembedding alone."""
    from transformers import LlamaConfig, LlamaForCausalLM  # deferred: transformers takes seconds to import

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.d_model, intermediate_size=2 * cfg.d_model,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=max(1, cfg.n_heads // 2),
        max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config).eval()


def _sparse_feature_rows(cfg: PlantedConfig, n_rows: int, mean_norm: float) -> torch.Tensor:
    """[V, D] embedding rows, each a sum of `features_per_token` of `n_features` random unit
    directions with weights ±U(0.5, 1.5) (random signs keep the mean activation, hence b_dec,
    near 0), rescaled to the random init's mean row norm."""
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    feats_GD = torch.nn.functional.normalize(torch.randn(cfg.n_features, cfg.d_model, generator=gen), dim=-1)
    picks_VK = torch.rand(n_rows, cfg.n_features, generator=gen).argsort(dim=-1)[:, :cfg.features_per_token]
    signs_VK = torch.randint(0, 2, (n_rows, cfg.features_per_token), generator=gen) * 2 - 1
    weights_VK = (0.5 + torch.rand(n_rows, cfg.features_per_token, generator=gen)) * signs_VK
    rows_VD = (weights_VK[..., None] * feats_GD[picks_VK]).sum(1)
    return rows_VD * (mean_norm / float(rows_VD.norm(dim=-1).mean()))


def _with_planted(model, token_ids: tuple[int, ...], vector_D: torch.Tensor):
    """A copy of `model` whose embedding rows `token_ids` have `vector_D` added."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        out.get_input_embeddings().weight[list(token_ids)] += vector_D
    return out


def _save(model, tokenizer, dest: Path) -> None:
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
