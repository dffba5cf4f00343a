"""Thread-safe randomness: seeded initialisation depends on its seed alone while other threads build models,
dropout draws from the trial's own generator, and code that changes torch's process-wide state runs alone."""

from __future__ import annotations

import threading
import time

import torch

from models import create_model, derive_seed, seeded_init
from models.seeding import TORCH_STATE, GeneratorDropout, dropout_generator, exclusive_torch_state, torch_compute


def test_derive_seed_is_deterministic_and_separates_uses():
    assert derive_seed(0, "student", 1) == derive_seed(0, "student", 1)
    seeds = {derive_seed(s, use, n) for s in (0, 1) for use in ("student", "batches") for n in (0, 1, 2)}
    assert len(seeds) == 12 and all(0 <= s < 2**63 for s in seeds)


def _weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_seeded_builds_are_identical_while_other_threads_build_models():
    with seeded_init(7):
        reference = _weights(create_model("digitnet", num_classes=10, in_channels=1))
    results, stop = [], threading.Event()

    def seeded():
        for _ in range(20):
            with seeded_init(7):
                results.append(_weights(create_model("digitnet", num_classes=10, in_channels=1)))

    def unseeded():  # another trial thread building (and drawing) without a seed of its own
        while not stop.is_set():
            create_model("digitnet", num_classes=10, in_channels=1).groups["head"]

    noise = [threading.Thread(target=unseeded) for _ in range(2)]
    workers = [threading.Thread(target=seeded) for _ in range(2)]
    for t in noise + workers:
        t.start()
    for t in workers:
        t.join()
    stop.set()
    for t in noise:
        t.join()
    assert len(results) == 40
    assert all(all(torch.equal(a, b) for a, b in zip(r, reference)) for r in results)


def test_generator_dropout_draws_from_the_given_generator():
    layer = GeneratorDropout(0.5).train()
    x = torch.ones(4, 100)

    def masked(seed):
        torch.rand(1000)  # the global generator moves between calls: it must not matter
        with dropout_generator(torch.nn.Sequential(layer), torch.Generator().manual_seed(seed)):
            return layer(x)

    a, b, c = masked(1), masked(1), masked(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(a.unique().tolist()) == {0.0, 2.0}  # kept units scaled by 1 / (1 - p)
    assert layer.generator is None  # detached after the block
    assert torch.equal(layer.eval()(x), x)


def test_plain_dropout_draws_from_the_given_generator_too():
    """A network's own `nn.Dropout` (torchvision, timm, user code) would draw from the global generator every
    thread shares; inside `dropout_generator` it draws from the trial's, and is a plain `nn.Dropout` again after."""
    model = torch.nn.Sequential(torch.nn.Dropout(0.5)).train()
    x = torch.ones(4, 100)

    def masked(seed):
        torch.rand(1000)  # the global generator moves between calls: it must not matter
        with dropout_generator(model, torch.Generator().manual_seed(seed)):
            return model(x)

    assert torch.equal(masked(1), masked(1)) and not torch.equal(masked(1), masked(2))
    assert type(model[0]) is torch.nn.Dropout


def test_exclusive_torch_state_waits_for_computations_and_holds_new_ones_back():
    """`torch.export` and the like run alone: after the computations in flight end, before any new one starts;
    a computation nested in one in flight never waits (no deadlock with a waiting exclusive holder)."""
    events: list[str] = []
    inside, waiting = threading.Event(), threading.Event()

    def trial():
        with torch_compute():
            inside.set()
            waiting.wait(5)
            while not TORCH_STATE._waiting:  # until the exclusive holder waits
                time.sleep(0.01)
            with torch_compute():  # nested: must not wait behind it
                events.append("nested")
            events.append("first done")
        with torch_compute():
            events.append("second")

    thread = threading.Thread(target=trial)
    thread.start()
    inside.wait(5)
    waiting.set()
    with exclusive_torch_state():
        events.append("exclusive")
        time.sleep(0.1)
        events.append("exclusive done")
    thread.join(5)
    assert events == ["nested", "first done", "exclusive", "exclusive done", "second"]
