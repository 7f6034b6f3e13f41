"""Train from live activations: run the model over the corpus while the SAE trains, with no
activation cache on disk.

The stream. The corpus's train split is tokenised once into N sequences of `context_size`, cut
as the cache cuts them, and kept on disk (`sae_transfer.token_file`: int32 rows read per chunk, so
host memory does not grow with the token budget). Epoch e visits them in a permutation drawn from
(seed, e), cut into *chunks* of whole sequences, `buffer_tokens / refill_parts` tokens each;
chunks are numbered g = 0, 1, ... across epochs. A chunk's activations are one or more forward
passes (`forward_tokens` each), captured at the hook and kept, like the model, on its device.

The buffer. It holds the `refill_parts` newest chunks (`buffer_tokens` activations). Refill r
computes chunk r and emits `buffer_tokens / refill_parts` tokens: part j of chunk r - j for
j = 0..refill_parts-1, where a chunk's parts are the slices of a random permutation of its
tokens (seeded by (seed, g)), and the emitted tokens are shuffled together (seeded by (seed, r)).
So a batch mixes tokens of `buffer_tokens / context_size` sequences, each token is emitted
exactly once per epoch, and with refill_parts=2 the buffer is refilled each time half of it has
been read (dictionary_learning's policy). Batches are consecutive `batch_size` slices of the
emitted stream (one may straddle two refills).

Why these defaults. buffer_tokens=262,144 is the cache reader's shuffle buffer, so live and
cached training mix at the same scale: at batch 4096 and context 128 a batch holds about two
tokens per sequence (about batch * context / buffer). dictionary_learning's default buffer is
larger (tens of thousands of contexts) and refills when half is read; SAELens keeps half of its
mixing buffer at every refill and re-shuffles it with the new half, so a token can stay for
many refills. Both amount to "replace half per refill"; refill_parts=2 does that with a
bounded stay (two refills), which is what makes the stream resumable cheaply. On a GPU the
buffer costs buffer_tokens * d_model * 4 bytes (2.4 GB at d_model 2304) plus one refill's
output; raise it for more mixing when memory allows.

Resume. Everything random derives from the seed and an index (epoch, chunk, refill), and a
refill needs only its own `refill_parts` chunks, so `make_source(b)` recomputes at most one
buffer of forward passes (the chunks behind batch b's refill) and then yields exactly the
batches an uninterrupted stream yields from batch b. The most recent chunks are kept between
sources of one `open_live_data` (the trainer reads the stream's start twice: scale estimate,
then training), so that costs no extra forward passes.

Tokens kept: every position, BOS included, no norm filter: the same rows the cache-trained
path reads (`open_training_data` reads datasets with an empty RowFilter). The scale factor is
estimated by the trainer from the stream's first tokens (`run.estimate_scale`, i.e.
`sae.scaling.scale_factor_of`), as for a cached dataset, and recorded in cfg.json.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sae_transfer.corpus import CorpusConfig, corpus_fingerprint, sequences_fingerprint
from sae_transfer.errors import UserError
from sae_transfer.models import check_hooks, load_model, model_identity
from sae_transfer.token_file import TokenFile, token_file
from sae_transfer.training.data import BUFFER_TOKENS, TrainingData

REFILL_PARTS = 2  # refill when 1/REFILL_PARTS of the buffer has been read (2: half, as dictionary_learning)
FORWARD_TOKENS = 16_384  # tokens per forward pass (the cache's batch_tokens)

# stream ids of the seeded draws, so no two draws share a seed
_EPOCH_ORDER, _CHUNK_PERM, _REFILL_PERM = 0, 1, 2


class _StopForward(Exception):
    """Raised from the last hook: the layers after it are not needed."""


@dataclass(frozen=True)
class LiveConfig:
    """The live source's buffer and forward-pass sizes."""

    buffer_tokens: int = BUFFER_TOKENS
    refill_parts: int = REFILL_PARTS
    forward_tokens: int = FORWARD_TOKENS
    check_finite: bool = True


def _draw(seed: int, stream: int, index: int, n: int) -> np.ndarray:
    """A permutation of n drawn from (seed, stream, index): the same on any machine."""
    return np.random.default_rng([seed, stream, index]).permutation(n)


class LiveActivations:
    """A model, one or more hooks and tokenised sequences, turned into a seeded, resumable
    activation stream.

    Several hooks share every forward pass (it stops after the last of them) and every draw: hook
    h's batches are exactly those a stream of h alone (same seed, sizes and sequences) yields, so
    SAEs trained from one multi-hook stream equal SAEs trained from one stream each.
    `source(start_batch)` is the SourceFactory of a one-hook stream, `source_of(hook)` that of
    one hook of several, `batches(start_batch)` yields {hook: batch}. `forward_tokens_run` counts
    the tokens sent through the model (tests and benches read it)."""

    def __init__(self, model, hook: str | list[str], tokens_NS: torch.Tensor | TokenFile, batch_size: int, seed: int = 0,
                 config: LiveConfig = LiveConfig(), epochs: int | None = None):
        if len(tokens_NS.shape) != 2 or tokens_NS.shape[0] == 0:
            raise UserError("no token sequences to run the model on")
        N, S = tokens_NS.shape
        if config.refill_parts < 1:
            raise UserError(f"refill_parts is {config.refill_parts}: pass at least 1")
        if config.buffer_tokens < max(batch_size, config.refill_parts * S):
            raise UserError(f"buffer of {config.buffer_tokens} tokens is smaller than a batch ({batch_size}) or than "
                            f"{config.refill_parts} sequences of {S}: raise --buffer-tokens")
        hooks = [hook] if isinstance(hook, str) else list(dict.fromkeys(hook))
        if not hooks:
            raise UserError("no hook to stream: name at least one")
        self.model, self.hooks, self.tokens_NS, self.batch_size, self.seed = model, hooks, tokens_NS, batch_size, seed
        self.config, self.epochs = config, epochs
        self.device = next(model.parameters()).device
        self.n_seqs, self.context_size = N, S
        self.chunk_seqs = max(1, config.buffer_tokens // config.refill_parts // S)
        self.chunks_per_epoch = math.ceil(N / self.chunk_seqs)
        self.forward_seqs = max(1, config.forward_tokens // S)
        self.forward_tokens_run = 0
        self._chunks: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()  # the newest chunks' activations
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its sequence order)
        self._pinned = 0  # chunks below this index are kept (pin_start)
        probe = self._forward(self._rows(torch.zeros(1, dtype=torch.int64))[:, :2])  # a 2-token probe: each hook's width
        self.d_in_by_hook = {h: int(a.shape[-1]) for h, a in probe.items()}
        self.forward_tokens_run = 0

    @property
    def hook(self) -> str:
        """The hook of a one-hook stream."""
        if len(self.hooks) != 1:
            raise ValueError(f"this stream has {len(self.hooks)} hooks: name one (source_of)")
        return self.hooks[0]

    @property
    def d_in(self) -> int:
        """The width of a one-hook stream."""
        return self.d_in_by_hook[self.hook]

    # -- forward passes ---------------------------------------------------------------
    def _forward(self, ids_BS: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every hook's activations {hook: [b*S, D]} float32 on the model's device; stops after the
        last hook fired."""
        got: dict[str, torch.Tensor] = {}

        def capture_as(name: str):  # by the name asked for (the bridge may call its hook point otherwise)
            def capture(acts, hook):
                if acts.dim() != 3:
                    raise UserError(f"hook {name!r} gives shape {tuple(acts.shape)}: only [batch, pos, d] hooks can train")
                got[name] = acts.detach().to(torch.float32, copy=True).reshape(-1, acts.shape[-1])
                if len(got) == len(self.hooks):
                    raise _StopForward
            return capture

        with torch.no_grad():  # not inference_mode: the trainer saves its input for backward
            try:
                self.model.run_with_hooks(ids_BS.to(self.device), return_type=None,
                                          fwd_hooks=[(h, capture_as(h)) for h in self.hooks])
            except _StopForward:
                pass
        missing = [h for h in self.hooks if h not in got]
        if missing:
            raise UserError(f"hook {missing[0]!r} did not fire in a forward pass: pick a hook on the model's main path")
        self.forward_tokens_run += ids_BS.numel()
        return got

    def _rows(self, seqs: torch.Tensor) -> torch.Tensor:
        """Token ids of sequences `seqs` [len, S] (from memory, or read from a TokenFile)."""
        if isinstance(self.tokens_NS, torch.Tensor):
            return self.tokens_NS.index_select(0, seqs)
        return self.tokens_NS.rows(seqs.numpy())

    # -- chunks -----------------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, _draw(self.seed, _EPOCH_ORDER, epoch, self.n_seqs))
        return self._order[1]

    def chunk_tokens(self, g: int) -> int:
        """Tokens in chunk g (the last chunk of an epoch may be short)."""
        i = g % self.chunks_per_epoch
        return min(self.chunk_seqs, self.n_seqs - i * self.chunk_seqs) * self.context_size

    def _part(self, g: int, j: int) -> tuple[int, int]:
        """[lo, hi) of part j of chunk g's token permutation."""
        n, m = self.chunk_tokens(g), self.config.refill_parts
        return j * n // m, (j + 1) * n // m

    def _chunk(self, g: int) -> dict[str, torch.Tensor]:
        """Chunk g's activations {hook: [tokens, D]} on the device (computed, or kept from a recent refill)."""
        if g in self._chunks:
            self._chunks.move_to_end(g)
            return self._chunks[g]
        e, i = divmod(g, self.chunks_per_epoch)
        seqs = torch.from_numpy(self._epoch_order(e)[i * self.chunk_seqs:(i + 1) * self.chunk_seqs].copy())
        parts = [self._forward(self._rows(seqs[s:s + self.forward_seqs]))
                 for s in range(0, len(seqs), self.forward_seqs)]
        acts = {h: torch.cat([p[h] for p in parts]) if len(parts) > 1 else parts[0][h] for h in self.hooks}
        if self.config.check_finite:
            finite = torch.stack([torch.isfinite(a).all() for a in acts.values()]).tolist()  # one sync per chunk
            for h, ok in zip(self.hooks, finite):
                if not ok:
                    raise UserError(f"non-finite activations at {h!r} in chunk {g} (epoch {e}): "
                                    "run the model in float32 or check its weights")
        self._chunks[g] = acts
        evictable = [c for c in self._chunks if c >= self._pinned]
        while len(evictable) > self.config.refill_parts:
            del self._chunks[evictable.pop(0)]
        return acts

    def pin_start(self, tokens: int) -> None:
        """Keep the chunks behind the stream's first `tokens` tokens until a refill past them (or
        `unpin`): several runs reading the stream's start (a group's scale estimates, then its
        training from batch 0) compute it once."""
        r, _ = self.locate(max(tokens - 1, 0))
        self._pinned = r + 1  # refill r reads chunks <= r

    def unpin(self) -> None:
        self._pinned = 0
        while len(self._chunks) > self.config.refill_parts:
            self._chunks.popitem(last=False)

    # -- refills ----------------------------------------------------------------------
    def _refill_chunks(self, r: int) -> list[tuple[int, int]]:
        """(chunk, part) pairs refill r emits."""
        last = None if self.epochs is None else self.epochs * self.chunks_per_epoch - 1
        return [(r - j, j) for j in range(self.config.refill_parts) if 0 <= r - j and (last is None or r - j <= last)]

    def refill_tokens(self, r: int) -> int:
        """Tokens refill r emits (known without a forward pass)."""
        return sum(hi - lo for g, j in self._refill_chunks(r) for lo, hi in [self._part(g, j)])

    def n_refills(self) -> int | None:
        """Refills in the stream (None: endless)."""
        return None if self.epochs is None else self.epochs * self.chunks_per_epoch + self.config.refill_parts - 1

    def refill(self, r: int) -> dict[str, torch.Tensor]:
        """The tokens refill r emits, in emission order {hook: [n, D]} on the device."""
        if self._pinned and r >= self._pinned:  # past the pinned start: its chunks are evictable again
            self._pinned = 0
        pieces: dict[str, list[torch.Tensor]] = {h: [] for h in self.hooks}
        for g, j in sorted(self._refill_chunks(r)):  # oldest chunk first: it may be evicted by the newest
            lo, hi = self._part(g, j)
            perm = torch.from_numpy(_draw(self.seed, _CHUNK_PERM, g, self.chunk_tokens(g))[lo:hi]).to(self.device)
            chunk = self._chunk(g)
            for h in self.hooks:
                pieces[h].append(chunk[h].index_select(0, perm))
        n = sum(p.shape[0] for p in pieces[self.hooks[0]])
        order = torch.from_numpy(_draw(self.seed, _REFILL_PERM, r, n)).to(self.device)
        return {h: (torch.cat(p) if len(p) > 1 else p[0]).index_select(0, order) for h, p in pieces.items()}

    def locate(self, token: int) -> tuple[int, int]:
        """(refill, offset in it) of the stream's `token`-th token (integer arithmetic only)."""
        r, start, end = 0, 0, self.n_refills()
        while end is None or r < end:
            n = self.refill_tokens(r)
            if token < start + n:
                return r, token - start
            r, start = r + 1, start + n
        return r, 0

    # -- batches ----------------------------------------------------------------------
    def source(self, start_batch: int = 0) -> LiveSource:
        """Batches of a one-hook stream from batch `start_batch` (the SourceFactory)."""
        return LiveSource(self, start_batch, self.hook)

    def source_of(self, hook: str):
        """The SourceFactory of one hook of this stream."""
        if hook not in self.hooks:
            raise ValueError(f"{hook!r} is not streamed here ({', '.join(self.hooks)})")
        return lambda start_batch=0: LiveSource(self, start_batch, hook)

    def batches(self, start_batch: int = 0) -> LiveSource:
        """{hook: batch} from batch `start_batch`: every hook's batch b, from one forward pass."""
        return LiveSource(self, start_batch, None)


class LiveSource:
    """Raw acts_BD batches (of `hook`; of every hook as {hook: batch} when None) from batch
    `start_batch` of a LiveActivations stream; `batches_yielded` counts from the stream's start."""

    def __init__(self, live: LiveActivations, start_batch: int = 0, hook: str | None = None):
        self.live, self.batches_yielded, self.hook = live, start_batch, hook

    def __iter__(self) -> Iterator[torch.Tensor | dict[str, torch.Tensor]]:
        live, B = self.live, self.live.batch_size
        hooks = live.hooks if self.hook is None else [self.hook]
        r, offset = live.locate(self.batches_yielded * B)
        end = live.n_refills()
        held: dict[str, torch.Tensor] | None = None
        while end is None or r < end:
            refill = live.refill(r)
            fresh = {h: refill[h][offset:] for h in hooks}
            r, offset = r + 1, 0
            held = fresh if held is None or held[hooks[0]].shape[0] == 0 else {h: torch.cat([held[h], fresh[h]]) for h in hooks}
            while held[hooks[0]].shape[0] >= B:
                batch = {h: a[:B] for h, a in held.items()}
                held = {h: a[B:] for h, a in held.items()}
                self.batches_yielded += 1
                yield batch if self.hook is None else batch[self.hook]
        # the last partial batch of a finite stream is dropped, as the cache reader does


def _as_corpus(corpus: CorpusConfig | str | Path) -> CorpusConfig:
    return corpus if isinstance(corpus, CorpusConfig) else CorpusConfig(source=str(corpus))


@dataclass(frozen=True)
class LiveStream:
    """One live stream over one or more hooks of a model, with each hook's cfg.json metadata."""

    live: LiveActivations
    metadata: dict[str, dict]  # hook -> what an SAE trained on it records (model, hook, corpus, ...)
    n_tokens: int  # corpus tokens in one epoch

    @property
    def hooks(self) -> list[str]:
        return self.live.hooks

    def data(self, hook: str) -> TrainingData:
        """The one-hook view an SAE trains on (the shape `open_training_data` returns)."""
        return TrainingData(self.live.source_of(hook), self.live.d_in_by_hook[hook], self.metadata[hook], self.n_tokens,
                            live=self.live)


def open_live_stream(
    model,
    hooks: list[str],
    corpus: CorpusConfig | str | Path,
    batch_size: int,
    seed: int = 0,
    buffer_tokens: int = BUFFER_TOKENS,
    context_size: int = 128,
    *,
    n_tokens: int | None = None,
    refill_parts: int = REFILL_PARTS,
    forward_tokens: int = FORWARD_TOKENS,
    prepend_bos: bool = True,
    epochs: int | None = None,
    device: str | None = None,
    model_dtype: str = "float32",
    revision: str | None = None,
) -> LiveStream:
    """A LiveStream that runs `model` (a loaded model, or a spec `load_model` boots) over the
    corpus's train split (its first `n_tokens` tokens, whole sequences; None or a smaller corpus:
    all of it) and streams every hook of `hooks` from the same forward passes. `epochs=None`
    loops forever."""
    corpus = _as_corpus(corpus)
    spec = str(model) if isinstance(model, (str, Path)) else None
    if spec is not None:
        model = load_model(spec, revision=revision, device=device, dtype=model_dtype)
    check_hooks(model, list(hooks))
    tokens = token_file(corpus, model.tokenizer, context_size=context_size, n_tokens=n_tokens, split="train",
                        prepend_bos=prepend_bos)  # on disk, read by row: host memory does not grow with n_tokens
    if n_tokens is not None and tokens.n_tokens > n_tokens and n_tokens >= context_size:
        n_seqs = n_tokens // context_size  # whole sequences only
        tokens = tokens.head(n_seqs, sequences_fingerprint(corpus, model.tokenizer, "train", context_size, prepend_bos,
                                                           n_seqs))
    tokens_NS = tokens
    live = LiveActivations(model, list(hooks), tokens_NS, batch_size, seed,
                           LiveConfig(buffer_tokens=buffer_tokens, refill_parts=refill_parts, forward_tokens=forward_tokens),
                           epochs=epochs)
    if spec is not None:
        identity = model_identity(spec, revision)
        local = identity["model_revision"].startswith("sha256:")
        name = Path(spec).expanduser().resolve().name if local else identity["model_id"]
        revision_id = identity["model_revision"]
    else:
        name, revision_id = getattr(getattr(model, "cfg", None), "model_name", None), None
    meta = {
        "model_name": name,
        "model_revision": revision_id,
        "context_size": context_size,
        "prepend_bos": prepend_bos,
        "dataset_path": None,
        "corpus_fingerprint": corpus_fingerprint(corpus),
        "tokens_fingerprint": tokens.fingerprint,
        "activation_source": "live",
        "buffer_tokens": buffer_tokens,
        "refill_parts": refill_parts,
    }
    return LiveStream(live, {h: {**meta, "hook_name": h} for h in live.hooks}, tokens.n_tokens)


def open_live_data(model, hook: str, corpus: CorpusConfig | str | Path, batch_size: int, seed: int = 0,
                   buffer_tokens: int = BUFFER_TOKENS, context_size: int = 128, **options) -> TrainingData:
    """TrainingData streaming `hook`'s activations live (`open_live_stream` with one hook); the same
    shape as `open_training_data`. Options as `open_live_stream`."""
    stream = open_live_stream(model, [hook], corpus, batch_size, seed, buffer_tokens, context_size, **options)
    return stream.data(hook)
