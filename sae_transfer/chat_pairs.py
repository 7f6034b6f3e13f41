"""The demo chat format: its special tokens, and (docstring -> function) instruction pairs mined
from Python source with `ast`.

A leaf module (stdlib only): the corpus's "demo-mixed" source and the demo pair
(`sae_transfer.demo`) both build on it, so neither imports the other for it."""

from __future__ import annotations

import ast
import io
import textwrap
from dataclasses import dataclass

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
USER, ASSISTANT, SYSTEM, END = "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"
# Reserved when the tokenizer is trained, so the chat model reuses the base vocabulary as is.
SPECIAL_TOKENS = (BOS, EOS, PAD, USER, ASSISTANT, SYSTEM, END)

# Pair-mining defaults (the demo pair's DemoPairConfig uses them as its own defaults).
CHAT_CONTEXT_SIZE = 256  # max tokens of one chat example (longer pairs are dropped)
MAX_DOCSTRING_CHARS = 400  # longer docstrings make poor prompts at this size
WITH_SIGNATURE = True  # put `name(args)` in the user turn along with the docstring


@dataclass(frozen=True)
class InstructionPair:
    """A user request (a docstring) and the answer (the function that docstring documents)."""

    prompt: str  # the docstring, plus `Signature: name(args)` when asked for
    response: str  # the function's source, dedented, docstring included
    source_file: str  # corpus document id (path relative to the stdlib root)


def function_pairs(doc_id: str, text: str, chat_context_size: int = CHAT_CONTEXT_SIZE,
                   max_docstring_chars: int = MAX_DOCSTRING_CHARS, with_signature: bool = WITH_SIGNATURE,
                   ) -> list[InstructionPair]:
    """The (docstring -> function) pairs of one Python source file, in syntax-tree order; none
    when it does not parse."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    pairs = []
    lines = io.StringIO(text, newline="").readlines()  # once: ast.get_source_segment re-splits per call
    max_response = 4 * chat_context_size  # ~3.5 chars per token: longer ones never fit
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc or len(doc) > max_docstring_chars or node.end_lineno is None:
            continue
        response = textwrap.dedent("".join(lines[node.lineno - 1: node.end_lineno])).rstrip()
        if len(response) > max_response:
            continue
        prompt = f"{doc}\nSignature: {node.name}({ast.unparse(node.args)})" if with_signature else doc
        pairs.append(InstructionPair(prompt, response, doc_id))
    return pairs
