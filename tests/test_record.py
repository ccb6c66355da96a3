import pytest
import torch

from trainwatch.record import Packer


def test_a_metric_flagged_absent_is_not_logged_and_the_entries_after_it_are_intact():
    packer = Packer(7)
    packer.metric("train/a", torch.tensor(1.5))
    packer.metrics("act_mean", ["x", "y", "z"], torch.tensor([0.25, 0.0, -3.0]), present=torch.tensor([True, False, True]))
    packer.array("table", torch.arange(6.0).reshape(2, 3))
    packer.metrics("grad_norm", ["x", "y"], torch.tensor([4.0, 5.0]))
    record = packer.ship().resolve()
    assert record.step == 7
    assert record.metrics == {"train/a": 1.5, "act_mean/x": 0.25, "act_mean/z": -3.0, "grad_norm/x": 4.0, "grad_norm/y": 5.0}
    assert record.arrays["table"].tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]


def test_flags_of_another_length_are_refused():
    with pytest.raises(ValueError, match="act_mean"):
        Packer(0).metrics("act_mean", ["x", "y"], torch.zeros(2), present=torch.ones(3, dtype=torch.bool))
