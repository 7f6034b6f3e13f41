"""The watcher evaluates several new checkpoints at once, never more than runner.max_checkpoints."""

from __future__ import annotations

from sae_transfer.checkpoints import Checkpoint
from sae_transfer.flows import watch
from sae_transfer.study import parse_study


def test_at_most_max_checkpoints_are_in_flight(monkeypatch):
    in_flight, most, finished = set(), [0], []

    def submit(config, path, step, saes, thresholds):
        in_flight.add(step)
        most[0] = max(most[0], len(in_flight))
        return [f"future-{step}"]

    def finish(config, path, step, futures):
        assert futures == [f"future-{step}"]  # each checkpoint finished with its own futures
        in_flight.remove(step)
        finished.append(step)
        return {"step": step}

    monkeypatch.setattr(watch, "submit_checkpoint", submit)
    monkeypatch.setattr(watch, "finish_checkpoint", finish)
    new = [Checkpoint(f"ckpt-{i}", i) for i in range(7)]
    for limit in (1, 3, 10):
        most[0], finished[:] = 0, []
        cfg = parse_study({"runner": {"max_checkpoints": limit}})
        done = watch.evaluate_new(cfg, new, {}, {})
        assert most[0] == min(limit, len(new)) and not in_flight
        assert finished == list(range(7)) and done == [{"step": i} for i in range(7)]
