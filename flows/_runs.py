"""Flow helpers: per-step timings read back from the Prefect API, CPU thread sharing."""

from __future__ import annotations

import os

import torch
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.context import get_run_context

from sae_transfer.models import default_device


async def _task_runs(flow_run_id):
    async with get_client() as client:
        return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


ALWAYS_RUNS = "always-runs"  # tag of cheap bookkeeping tasks that are never cached


def step_timings() -> dict[str, tuple[float, bool | None]]:
    """Task run name -> (seconds it ran, whether Prefect served it from the cache; None for
    bookkeeping tasks tagged ALWAYS_RUNS, which run every time by design)."""
    from prefect.utilities.asyncutils import run_coro_as_sync

    flow_run_id = get_run_context().flow_run.id
    runs = run_coro_as_sync(_task_runs(flow_run_id)) or []
    timings: dict[str, tuple[float, bool]] = {}
    for r in sorted(runs, key=lambda r: r.expected_start_time or r.created):
        if r.state and r.state.state_details.child_flow_run_id:
            continue  # a subflow (the checkpoint watcher) is not a step of its own
        name, n = r.name, 1
        while name in timings:  # same task on several hooks
            n += 1
            name = f"{r.name}#{n}"
        cached = None if ALWAYS_RUNS in (r.tags or []) else r.state_name == "Cached"
        timings[name] = (r.total_run_time.total_seconds(), cached)
    return timings


def current_run_id() -> str:
    """The id of the flow run we are in."""
    return str(get_run_context().flow_run.id)


def preload_model_libraries() -> None:
    """Import transformers' and TransformerLens's lazy modules once, in the flow's thread.

    Tasks run in threads; transformers resolves `from transformers import AutoTokenizer` through
    a lazy module, and two threads doing that for the first time at once can see a half-built
    module ("cannot import name 'AutoTokenizer'"). Importing up front makes every later import a
    dictionary lookup."""
    from transformer_lens.model_bridge import TransformerBridge  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401


def serialise_ast_parsing() -> None:
    """Make every `ast.parse` in this process take one lock (idempotent).

    CPython 3.11 keeps the AST constructor's recursion bookkeeping per interpreter, not per
    thread: two threads building ASTs at once fail with "AST constructor recursion depth
    mismatch". Our own parses (the demo's instruction pairs) hold a lock, but tasks run beside
    library code that parses too (traceback's caret anchors, TorchScript sources), so flows route
    the module-level `ast.parse` through the same lock."""
    import ast

    from sae_transfer.chat_pairs import AST_LOCK as _AST_LOCK

    if getattr(ast.parse, "_serialised", False):
        return
    original = ast.parse

    def parse(*args, **kwargs):
        with _AST_LOCK:
            return original(*args, **kwargs)

    parse._serialised = True
    ast.parse = parse


def share_cpu_threads(config) -> None:
    """Tasks run concurrently in threads of one process; on CPU each gets its share of the cores
    (torch's default of one thread per core per task oversubscribes and runs several times slower).
    Also preloads the model libraries (see `preload_model_libraries`), as every flow calls this first."""
    preload_model_libraries()
    serialise_ast_parsing()
    if (config.device or default_device()) == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
