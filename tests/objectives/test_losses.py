"""The distill stage's loss terms against hand computations in plain Python (math), on tiny examples; the feature
term's gradient reaches the student."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import create_model
from objectives.layer_terms import feature_term, make_adapters, params_l2
from objectives.losses import distill_loss, kd_loss

STUDENT = [[1.0, 2.0, 0.5], [-0.5, 0.0, 3.0]]
TEACHER = [[0.3, -1.0, 2.0], [2.0, 1.0, -1.0]]
LABELS = [1, 0]


def softmax(z: list[float], temperature: float = 1.0) -> list[float]:
    e = [math.exp(v / temperature) for v in z]
    return [v / sum(e) for v in e]


def hand_kd(s: list[float], t: list[float], temperature: float) -> float:
    p, q = softmax(t, temperature), softmax(s, temperature)
    return temperature**2 * sum(pk * (math.log(pk) - math.log(qk)) for pk, qk in zip(p, q))


def hand_ce(s: list[float], label: int) -> float:
    return -math.log(softmax(s)[label])


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0, 0.5])
def test_kd_loss_matches_hand_computation_with_t_squared(temperature):
    got = kd_loss(t(STUDENT), t(TEACHER), temperature)
    assert got.shape == (2,)  # per example
    for i in range(2):
        assert got[i].item() == pytest.approx(hand_kd(STUDENT[i], TEACHER[i], temperature), rel=1e-12)
    # The T^2 factor: the loss is T^2 times the plain KL divergence of the softened distributions.
    kl = F.kl_div(F.log_softmax(t(STUDENT) / temperature, 1), F.log_softmax(t(TEACHER) / temperature, 1),
                  reduction="none", log_target=True).sum(1)
    torch.testing.assert_close(got, temperature**2 * kl)


def test_kd_loss_is_zero_for_identical_logits_and_positive_otherwise():
    assert torch.allclose(kd_loss(t(TEACHER), t(TEACHER), 3.0), torch.zeros(2, dtype=torch.float64))
    assert (kd_loss(t(STUDENT), t(TEACHER), 3.0) > 0).all()


def test_distill_loss_with_alpha_zero_is_cross_entropy():
    s, tl, y = t(STUDENT), t(TEACHER), torch.tensor(LABELS)
    got = distill_loss(s, tl, y, alpha=0.0, temperature=4.0)
    assert torch.equal(got, F.cross_entropy(s, y, reduction="none"))
    for i in range(2):
        assert got[i].item() == pytest.approx(hand_ce(STUDENT[i], LABELS[i]), rel=1e-12)


@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_distill_loss_mixes_kd_and_label_terms(alpha):
    temperature = 2.5
    got = distill_loss(t(STUDENT), t(TEACHER), torch.tensor(LABELS), alpha, temperature)
    for i in range(2):
        want = alpha * hand_kd(STUDENT[i], TEACHER[i], temperature) + (1 - alpha) * hand_ce(STUDENT[i], LABELS[i])
        assert got[i].item() == pytest.approx(want, rel=1e-12)


def test_distill_loss_without_labels_is_the_weighted_kd_term_alone():
    alpha, temperature = 0.4, 3.0
    got = distill_loss(t(STUDENT), t(TEACHER), None, alpha, temperature)
    for i in range(2):
        assert got[i].item() == pytest.approx(alpha * hand_kd(STUDENT[i], TEACHER[i], temperature), rel=1e-12)


def test_distill_loss_without_labels_at_alpha_zero_has_no_teacher_signal():
    student = t(STUDENT).requires_grad_(True)
    got = distill_loss(student, t(TEACHER), None, 0.0, 3.0)
    assert torch.equal(got, torch.zeros(2, dtype=got.dtype))
    assert not got.requires_grad  # nothing of the teacher can reach the student


def test_feature_term_gradient_reaches_the_student_and_not_the_teacher():
    torch.manual_seed(0)
    student = create_model("digitnet", num_classes=10, in_channels=1, group_widths={"block1": 0.5})
    teacher = create_model("digitnet", num_classes=10, in_channels=1)
    groups = ["block1", "block2"]
    # A made-up channel mismatch on block2, so the adapter path is taken too.
    adapters = make_adapters({"block1": (24, 4, 4), "block2": (48, 2, 2)}, {"block1": (24, 4, 4), "block2": (40, 2, 2)},
                             groups)
    assert list(adapters) == ["block2"]  # only where the channel counts differ
    adapters["block2"] = torch.nn.Conv2d(48, 48, 1)  # the real shapes agree: keep the adapter, map 48 -> 48
    term, remove = feature_term(student, teacher, groups, adapters)
    x = torch.rand(4, 1, 8, 8)
    student(x)
    teacher(x)
    value = term()
    assert value.item() > 0
    value.backward()
    remove()
    for g in groups:  # a detached student output would leave these without gradient
        grads = [p.grad for p in student.groups[g].parameters()]
        assert all(gr is not None for gr in grads) and any(gr.abs().sum() > 0 for gr in grads), g
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in adapters.parameters())


def test_params_l2_sums_squared_distance_of_trainable_anchored_weights():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    start = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("0.")}
    assert params_l2(model, start).item() == 0.0
    with torch.no_grad():
        model[0].weight += 0.5  # 6 entries moved by 0.5 -> 6 * 0.25
        model[0].bias -= torch.tensor([1.0, 2.0])  # 1 + 4
        model[1].weight += 10.0  # not anchored (not in start): ignored
    assert params_l2(model, start).item() == pytest.approx(6 * 0.25 + 1.0 + 4.0)
    model[0].bias.requires_grad_(False)  # frozen weights do not count
    assert params_l2(model, start).item() == pytest.approx(6 * 0.25)
    # Differentiable: the gradient of sum (p - p0)^2 is 2 (p - p0).
    params_l2(model, start).backward()
    torch.testing.assert_close(model[0].weight.grad, torch.full((2, 3), 1.0))


def test_params_l2_with_nothing_anchored_is_zero():
    model = nn.Linear(2, 2)
    got = params_l2(model, {})
    assert got.shape == () and got.item() == 0.0
