"""ModelInputs: Lightning's `example_input_array` forms, split by samples and joined back."""

from __future__ import annotations

from collections import UserDict, namedtuple

import pytest
import torch
from torch import nn

from trainwatch.probes.model_inputs import ModelInputs, concat, inputs_of, same_form


class Recorded(nn.Module):
    def forward(self, *args, **kwargs):
        return args, kwargs


def test_the_three_forms_call_the_model_as_lightning_does():
    x = torch.randn(4, 3)
    assert Recorded()(*ModelInputs.of(x).args) == ((x,), {})
    args, kwargs = ModelInputs.of([x, x + 1]).forward(Recorded())
    assert len(args) == 2 and kwargs == {} and torch.equal(args[1], x + 1)
    args, kwargs = ModelInputs.of({"ids": x, "mask": x > 0}).forward(Recorded())
    assert args == () and list(kwargs) == ["ids", "mask"]
    with pytest.raises(ValueError, match=r"must be a tensor .* got int"):
        ModelInputs.of(3)


def test_parts_slice_every_sample_tensor_nested_and_pass_the_rest_whole():
    """A forward that takes a dict of features and a temperature: the 0-d tensor and the flag go to every part."""
    ids, mask, temperature = torch.arange(10).reshape(5, 2), torch.ones(5, 2, dtype=torch.bool), torch.tensor(0.5)
    inputs = ModelInputs(({"ids": ids, "mask": mask}, temperature), {"flag": True})
    assert inputs.samples == 5
    parts = inputs.parts(2)
    assert [p.samples for p in parts] == [3, 2]
    assert torch.equal(parts[1].args[0]["ids"], ids[3:]) and parts[1].args[1] is temperature and parts[1].kwargs == {"flag": True}
    joined = concat(parts)
    assert torch.equal(joined.args[0]["ids"], ids) and torch.equal(joined.args[0]["mask"], mask) and joined.args[1] is temperature
    assert torch.equal(inputs.head(2).args[0]["ids"], ids[:2])


def test_inputs_without_one_batch_of_samples_are_refused_with_their_shapes():
    with pytest.raises(ValueError, match=r"found shape \(4, 2\) float32, shape \(3,\) int64"):
        ModelInputs((torch.zeros(4, 2), torch.zeros(3, dtype=torch.long)))
    with pytest.raises(ValueError, match="found no tensor"):
        ModelInputs(("text",))
    with pytest.raises(ValueError, match=r"found shape \(\) float32"):
        ModelInputs((torch.tensor(1.0),))


def test_state_is_plain_host_tensors_and_a_bare_tensor_is_an_older_checkpoints_probe():
    inputs = ModelInputs((torch.ones(2, 3),), {"mask": torch.zeros(2, dtype=torch.bool)})
    state = inputs.state()
    assert type(state["args"]) is tuple and type(state["kwargs"]) is dict
    back = ModelInputs.from_state(state)
    assert back is not None and torch.equal(back.kwargs["mask"], inputs.kwargs["mask"])
    old = ModelInputs.from_state(torch.ones(3, 4))
    assert old is not None and old.samples == 3 and old.kwargs == {}
    assert ModelInputs.from_state(None) is None


def test_inputs_of_a_batch_follow_example_input_array():
    x, y, mask = torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.ones(4, 3)
    assert inputs_of((x, y)).args[0] is x and len(inputs_of((x, y)).args) == 1
    assert inputs_of(x).args[0] is x
    two = inputs_of((x, mask, y), template=(torch.zeros(1, 3), torch.zeros(1, 3)))
    assert two.args[0] is x and two.args[1] is mask and len(two.args) == 2
    named = inputs_of({"x": x, "mask": mask, "y": y}, template={"x": None, "mask": None})
    assert named.args == () and list(named.kwargs) == ["x", "mask"]
    with pytest.raises(ValueError, match=r"are unknown: the batches are dicts \(keys 'x', 'y'\).*`example_input_array`"):
        inputs_of({"x": x, "y": y})
    with pytest.raises(ValueError, match=r"lack 'mask', which `example_input_array` names"):
        inputs_of({"x": x, "y": y}, template={"x": None, "mask": None})
    with pytest.raises(ValueError, match=r"the batches are str"):
        inputs_of("a sentence")


def test_same_form_tells_which_batches_can_be_joined():
    a = ModelInputs((torch.zeros(4, 7),), {"mask": torch.ones(4, 7)})
    assert same_form(a, ModelInputs((torch.zeros(2, 7),), {"mask": torch.ones(2, 7)}))
    assert not same_form(a, ModelInputs((torch.zeros(4, 9),), {"mask": torch.ones(4, 9)}))  # padded to another length
    assert not same_form(a, ModelInputs((torch.zeros(4, 7),), {"other": torch.ones(4, 7)}))
    assert not same_form(a, ModelInputs((torch.zeros(4, 7, dtype=torch.float64),), {"mask": torch.ones(4, 7)}))


def test_mapping_batches_such_as_batch_encoding_and_feature_dicts_beside_targets():
    """Hugging Face's padding collators return a `BatchEncoding`, a UserDict; a `(features, labels)` batch with a dict
    `example_input_array` forwards the features as keywords, as Lightning's convention does."""
    ids, mask, y = torch.ones(4, 6, dtype=torch.long), torch.ones(4, 6), torch.zeros(4, dtype=torch.long)
    template = {"input_ids": None, "attention_mask": None}
    encoded = inputs_of(UserDict({"input_ids": ids, "attention_mask": mask, "labels": y}), template)
    assert list(encoded.kwargs) == ["input_ids", "attention_mask"] and encoded.kwargs["input_ids"] is ids
    pair = inputs_of(({"input_ids": ids, "attention_mask": mask}, y), template)
    assert pair.args == () and pair.kwargs["attention_mask"] is mask
    assert ModelInputs.of(UserDict({"input_ids": ids})).kwargs["input_ids"] is ids
    with pytest.raises(ValueError, match=r"but `example_input_array` is a Tensor, not a dict of the forward's keyword inputs"):
        inputs_of({"input_ids": ids, "labels": y}, torch.zeros(1, 6))
    with pytest.raises(ValueError, match=r"keys must be strings, got \[0\]"):
        ModelInputs.of({0: ids})


def test_same_form_sees_key_order_so_concat_never_pairs_one_keys_rows_with_anothers():
    a = ModelInputs((), {"img": torch.zeros(2, 3), "txt": torch.ones(2, 3)})
    swapped = ModelInputs((), {"txt": torch.ones(2, 3), "img": torch.zeros(2, 3)})
    assert not same_form(a, swapped)
    assert same_form(a, ModelInputs((), {"img": torch.zeros(5, 3), "txt": torch.ones(5, 3)}))


def test_an_empty_probe_is_refused():
    with pytest.raises(ValueError, match=r"found shape \(0, 3\) float32"):
        ModelInputs((torch.zeros(0, 3),))


Features = namedtuple("Features", ["ids", "mask"])


def test_inputs_a_weights_only_checkpoint_could_not_load_are_not_saved(tmp_path):
    """Lightning loads checkpoints with `weights_only=True`: a named tuple in the saved probe would make the whole
    checkpoint unloadable, so it is not saved (a resumed fit draws its probe again)."""
    plain = ModelInputs(([torch.ones(2, 3), {"mask": torch.zeros(2, 3)}], 0.5, None, "mean"), {"flag": True})
    path = tmp_path / "state.pt"
    torch.save({"probe_inputs": plain.state()}, path)
    loaded = torch.load(path, weights_only=True)["probe_inputs"]
    assert ModelInputs.from_state(loaded).args[1:] == (0.5, None, "mean")
    named = ModelInputs((Features(torch.ones(2, 3), torch.ones(2, 3)),))
    assert named.state() is None
    torch.save({"probe_inputs": ModelInputs((Features(torch.ones(2, 3), torch.ones(2, 3)),)).args}, path)
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path, weights_only=True)  # what saving it would have done to the checkpoint
