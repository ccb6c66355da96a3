import random

import numpy as np
import torch
from torch import nn

from trainwatch.probes._scope import untouched


def test_untouched_restores_mode_bn_buffers_grads_and_rng():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    model.train()
    model[2].eval()  # a mixed-mode model must come back mixed
    model(torch.randn(8, 3)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    buffers = [b.clone() for b in model[1].buffers()]
    torch_state = torch.get_rng_state()
    py_state, np_state = random.getstate(), np.random.get_state()

    with untouched(model, eval_mode=False) as m:
        m.train()
        m(torch.randn(8, 3))  # updates BN running stats in train mode
        torch.rand(3), random.random(), np.random.rand()
        for p in m.parameters():
            p.grad = None

    assert [mod.training for mod in model.modules()] == [True, True, True, False]
    assert all(torch.equal(a, b) for a, b in zip(buffers, model[1].buffers(), strict=True))
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters(), strict=True))
    assert torch.equal(torch_state, torch.get_rng_state())
    assert random.getstate() == py_state
    assert np.array_equal(np.random.get_state()[1], np_state[1])


def test_untouched_defaults_to_eval_and_no_grad():
    model = nn.Linear(2, 2).train()
    with untouched(model) as m:
        assert not m.training
        assert not torch.is_grad_enabled()
    assert model.training and torch.is_grad_enabled()
