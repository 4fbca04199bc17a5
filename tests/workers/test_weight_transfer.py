"""The broadcast's wire format (bucket plan, layout, views, checksum): pure functions, no engine."""

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from workers.weight_transfer import ALIGN, Bucket, TensorMeta, checksum, layout, plan_buckets, views

SHAPES = [
    ("a", "float32", [3, 5]),
    ("b", "bfloat16", [7]),
    ("c", "float32", []),
    ("d", "float16", [2, 2, 3]),
    ("e", "float32", [1000]),
    ("f", "int64", [9]),
]


def _metas() -> list[TensorMeta]:
    return [TensorMeta(name=n, dtype=d, shape=s) for n, d, s in SHAPES]


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, dtype, shape in SHAPES:
        t = torch.randn(shape, generator=g) * 100
        out[name] = t.to(getattr(torch, dtype))
    return out


def test_every_tensor_starts_aligned_and_the_bucket_is_padded() -> None:
    offsets, total = layout(_metas())
    sizes = [t.numel() * t.element_size() for t in _tensors().values()]
    assert all(o % ALIGN == 0 for o in offsets) and total % ALIGN == 0
    assert all(b >= a + size for a, b, size in zip(offsets, offsets[1:], sizes))  # no overlap
    assert total >= offsets[-1] + sizes[-1]


def test_views_give_back_exactly_what_was_packed() -> None:
    metas, tensors = _metas(), _tensors()
    offsets, total = layout(metas)
    buffer = torch.zeros(total, dtype=torch.uint8)
    for meta, offset in zip(metas, offsets):
        flat = tensors[meta.name].reshape(-1).view(torch.uint8)
        buffer[offset : offset + flat.numel()] = flat
    got = dict(views(buffer, metas))
    assert list(got) == [m.name for m in metas]
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape and torch.equal(got[name], t)


@pytest.mark.parametrize("limit", [64, 256, 4096, 10**9])
def test_buckets_keep_the_order_and_stay_within_the_limit(limit: int) -> None:
    metas = _metas()
    buckets = plan_buckets(metas, limit)
    assert [m for b in buckets for m in b] == metas
    for bucket in buckets:  # only a tensor larger than the limit makes a bucket larger than it
        assert layout(bucket)[1] <= limit or len(bucket) == 1
    assert len(buckets) == 1 if limit == 10**9 else len(buckets) > 1


def test_the_checksum_sees_any_single_flipped_bit() -> None:
    rng = np.random.default_rng(0)
    data = torch.from_numpy(rng.integers(0, 256, 1 << 16, dtype=np.uint8))
    reference = checksum(data)
    assert checksum(data.clone()) == reference
    for position in rng.integers(0, data.numel(), 50):
        bit = 1 << int(rng.integers(0, 8))
        data[position] ^= bit
        assert checksum(data) != reference, int(position)
        data[position] ^= bit
    assert checksum(data[:-1]) != reference  # a short bucket too


def test_bucket_headers_reject_what_no_push_sends() -> None:
    good = dict(version=1, index=0, count=1, tensors=_metas()[:1], nbytes=64, checksum="xxh3:0")
    Bucket(**good)
    for bad in ({"tensors": []}, {"index": -1}, {"count": 0}, {"nbytes": 0}, {"surprise": 1}):
        with pytest.raises(ValidationError):
            Bucket(**(good | bad))
    with pytest.raises(ValueError, match="unknown dtype"):
        layout([TensorMeta(name="x", dtype="not_a_dtype", shape=[1])])
