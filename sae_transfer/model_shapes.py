"""What a plan needs of a model, from its configuration only (never its weights): width, depth,
vocabulary, parameter count. `study_shapes` gives the shapes of a study's pair."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sae_transfer.errors import UserError
from sae_transfer.study import StudyConfig


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a model: read from its configuration, never from its weights."""

    name: str
    d_model: int
    n_layers: int
    vocab: int
    n_params: int
    d_mlp: int = 0
    max_positions: int | None = None
    tied_embeddings: bool = False

    @property
    def block_params(self) -> float:
        """Parameters of one transformer block (total less embedding and unembedding, over layers)."""
        embed = self.vocab * self.d_model * (1 if self.tied_embeddings else 2)
        return max(self.n_params - embed, 0) / max(self.n_layers, 1)

    @property
    def forward_params(self) -> float:
        """Parameters a full forward pass multiplies with (blocks and unembedding)."""
        return self.block_params * self.n_layers + self.vocab * self.d_model


def shape_of(hf_config, name: str = "") -> ModelShape:
    """ModelShape of a `transformers` config object (parameters counted on the meta device: no
    memory, no weights; a formula when the model class cannot be built)."""
    text = getattr(hf_config, "get_text_config", lambda: hf_config)()
    d = int(getattr(text, "hidden_size", None) or getattr(text, "n_embd", None) or text.d_model)
    layers = int(getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None) or text.num_layers)
    vocab = int(text.vocab_size)
    d_mlp = int(getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * d)
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    max_pos = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    n_params = _count_params(hf_config)
    if n_params is None:  # a Llama-like block: attention 4 d^2, gated MLP 3 d d_mlp
        n_params = layers * (4 * d * d + 3 * d * d_mlp) + vocab * d * (1 if tied else 2)
    return ModelShape(name or getattr(hf_config, "_name_or_path", "") or "model", d, layers, vocab, int(n_params),
                      d_mlp, int(max_pos) if max_pos else None, tied)


def _count_params(hf_config) -> int | None:
    try:
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # an architecture transformers cannot build here: fall back to the formula
        return None


def load_shape(spec: str, revision: str | None = None, trust_remote_code: bool = False) -> ModelShape:
    """A model's shape from its configuration only: a local folder, the Hub cache, or the Hub."""
    from transformers import AutoConfig

    from sae_transfer import remote
    from sae_transfer.models import parse_model_spec

    local = remote.config_copy(spec) if remote.is_remote(spec) else Path(spec).expanduser()
    ref = parse_model_spec(str(local), None) if local.is_dir() else parse_model_spec(spec, revision)
    name, rev = ref.name, ref.revision
    try:
        cfg = AutoConfig.from_pretrained(name, revision=rev, trust_remote_code=trust_remote_code)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot read the configuration of model {spec!r} ({first[:160]}): download it once "
                        "(it is a few kB), or build the demo pair for the demo config") from None
    return shape_of(cfg, spec)


def _demo_shape(name: str) -> ModelShape:
    """The demo pair's shape from its build config (for a plan before `demo-models` has run)."""
    from sae_transfer.demo.config import DemoPairConfig

    c = DemoPairConfig()
    n = c.n_layers * (4 * c.d_model * c.d_model + 3 * c.d_model * c.d_mlp + 2 * c.d_model) + 2 * c.vocab_size * c.d_model
    return ModelShape(name, c.d_model, c.n_layers, c.vocab_size, n, c.d_mlp, c.context_size)


def study_shapes(cfg: StudyConfig, shapes: Mapping[str, ModelShape | object] | None = None) -> dict[str, ModelShape]:
    """role (base, chat) -> shape. `shapes` may give one per role or per model spec, as a ModelShape
    or a `transformers` config; the rest are read from the models' configurations."""
    shapes = shapes or {}
    out = {}
    for role, spec, rev in (("base", cfg.pair.base, cfg.pair.base_revision), ("chat", cfg.pair.chat, cfg.pair.chat_revision)):
        given = shapes.get(role, shapes.get(spec))
        if given is not None:
            out[role] = given if isinstance(given, ModelShape) else shape_of(given, spec)
        elif cfg.pair.build_demo and not Path(spec).expanduser().is_dir():
            out[role] = _demo_shape(spec)
        else:
            out[role] = load_shape(spec, rev, cfg.pair.trust_remote_code)
    return out
