"""LR schedules come from transformers' schedulers, shaped by the train config."""

from __future__ import annotations

import pytest
import torch

from keepmix.config import TrainConfig
from keepmix.training.session import _lr_scheduler


def lrs(**kw) -> list[float]:
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = _lr_scheduler(opt, TrainConfig(steps=100, lr=1.0, **kw))
    out = []
    for _ in range(100):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_warmup_then_shapes():
    cos = lrs(lr_schedule="cosine", warmup=10, min_lr_ratio=0.1)
    assert cos[0] == 0 and cos[5] == pytest.approx(0.5) and cos[10] == pytest.approx(1.0)
    assert cos[99] == pytest.approx(0.1, abs=0.01) and cos[55] == pytest.approx(0.55, abs=0.01)
    lin = lrs(lr_schedule="linear", warmup=0.1)
    assert lin[10] == pytest.approx(1.0) and lin[55] == pytest.approx(0.5)
    const = lrs(lr_schedule="constant", warmup=5)
    assert const[4] == pytest.approx(0.8) and set(const[5:]) == {1.0}
    wsd = lrs(lr_schedule="wsd", warmup=10, decay=0.2)
    assert set(wsd[10:80]) == {1.0}  # stable until the last 20 %
    assert wsd[90] < 1.0 and wsd[99] < 0.05
