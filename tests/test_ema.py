"""EMA teacher: no gradients ever, and exactly the EMA of the student."""

import torch

from odis_core.train.ema import make_teacher, update_teacher


def test_teacher_has_no_gradients_and_follows_the_ema():
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.GELU(), torch.nn.Linear(3, 2))
    teacher = make_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    expected = [p.detach().clone() for p in teacher.parameters()]
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    for momentum in (0.9, 0.99, 0.5):
        x = torch.randn(8, 4)
        # Both nets see the batch; only the student's loss is optimised.
        loss = student(x).pow(2).sum() + teacher(x).pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in teacher.parameters())
        optimizer.step()
        update_teacher(teacher, student, momentum)
        expected = [momentum * e + (1 - momentum) * s.detach()
                    for e, s in zip(expected, student.parameters(), strict=True)]
        for got, want in zip(teacher.parameters(), expected, strict=True):
            torch.testing.assert_close(got, want)
