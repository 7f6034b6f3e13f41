"""The offline demo model pair: a small Llama-style base model pretrained on the Python
standard library's sources, and a chat model fine-tuned from it on docstring -> function
instruction pairs, with intermediate fine-tuning checkpoints.

    from sae_transfer.demo import build_demo_pair, demo_paths, DEMO_HOOK
    report = build_demo_pair("artifacts/demo-models")   # cached: a second call returns at once
    paths = demo_paths("artifacts/demo-models")         # .base, .chat, .checkpoint_dirs()
"""

from sae_transfer.chat_pairs import SPECIAL_TOKENS
from sae_transfer.demo.build import DemoPairReport, build_demo_pair, checkpoint_steps, read_manifest
from sae_transfer.demo.chat import InstructionPair, encode_pairs, greedy_rollout, instruction_pairs
from sae_transfer.demo.config import (
    DEFAULT_OUT,
    DEMO_HOOK,
    PRESETS,
    DemoPairConfig,
    DemoPairPaths,
    demo_paths,
)
from sae_transfer.demo.tokenizer import CHAT_TEMPLATE, ChatEncoding, chat_messages, encode_chat

__all__ = [
    "CHAT_TEMPLATE", "ChatEncoding", "DEFAULT_OUT", "DEMO_HOOK", "DemoPairConfig", "DemoPairPaths",
    "DemoPairReport", "InstructionPair", "PRESETS", "SPECIAL_TOKENS", "build_demo_pair", "chat_messages",
    "checkpoint_steps", "demo_paths", "encode_chat", "encode_pairs", "greedy_rollout",
    "instruction_pairs", "read_manifest",
]
