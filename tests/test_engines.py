"""What the engines share: length groups, and which engine runs where."""
import random

import pytest
import torch
from mgeo_service.engines import length_groups, resolve_backend


@pytest.mark.parametrize("padding", [1.0, 1.1, 1.25])
def test_length_groups_cover_every_pair_once_and_bound_their_padding(padding):
    lengths = [random.Random(seed).randint(3, 128) for seed in range(200)]
    groups = length_groups(lengths, padding)
    assert sorted(i for group in groups for i in group) == list(range(200))
    for group in groups:
        group_lengths = [lengths[i] for i in group]
        assert group_lengths == sorted(group_lengths)
        assert len(group) * max(group_lengths) <= padding * sum(group_lengths)
    longest = [max(lengths[i] for i in group) for group in groups]
    assert longest == sorted(longest)
    assert len(length_groups([7] * 32, padding)) == 1  # equal lengths never split


def test_auto_is_onnx_runtime_on_a_cpu_and_torch_on_cuda():
    assert resolve_backend("auto", torch.device("cpu")) == "onnxruntime"
    assert resolve_backend("auto", torch.device("cuda")) == "torch"
    assert resolve_backend("torch", torch.device("cpu")) == "torch"
