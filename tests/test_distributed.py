"""Process helpers shared by train.py and evaluate.py: sharding keeps every rank's batch count equal and the
gather drops the repeats; the compute dtype follows the device."""
import torch

from infra.distributed import Distributed, compute_dtype, gather, shard


def test_shards_cover_every_item_once_with_equal_lengths_padded_by_repeats():
    items = list("abcdefg")
    shards = [shard(items, rank, 3) for rank in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]
    assert shards[2] == [(2, "c"), (5, "f"), (5, "f")]  # the short rank repeats its last item
    unique = {index: item for part in shards for index, item in part}
    assert [unique[i] for i in sorted(unique)] == items
    assert shard([], 0, 2) == []


def test_gather_in_one_process_returns_the_rows():
    assert gather([1, 2], Distributed()) == [1, 2]


def test_compute_dtype_is_fp32_on_the_cpu_unless_asked():
    cpu = torch.device("cpu")
    assert compute_dtype("auto", cpu) == torch.float32
    assert compute_dtype("bf16", cpu) == torch.bfloat16 and compute_dtype("fp32", cpu) == torch.float32
