"""prot_lib.utils: the one atomic-write helper and the one batch-clone helper."""
from __future__ import annotations

from collections import namedtuple

import pytest
import torch

from prot_lib.utils import atomic_torch_save, atomic_write, atomic_write_text, clone_batch


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "sub" / "result.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_write(target, "w") as f:
            f.write("half of the new cont")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.json"]
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb'"):
        with atomic_write(target, "a"):
            pass


def test_atomic_torch_save_round_trips(tmp_path):
    obj = {"w": torch.arange(6.0).reshape(2, 3), "step": 7}
    path = atomic_torch_save(obj, tmp_path / "x.pt")
    back = torch.load(path)
    assert back["step"] == 7 and torch.equal(back["w"], obj["w"])


def test_clone_batch_copies_every_tensor_and_keeps_the_structure():
    Batch = namedtuple("Batch", "x y")
    x = torch.ones(2, 3, 4, requires_grad=True)
    batch = {"pair": Batch(x * 2, torch.zeros(2)), "list": [torch.ones(1)], "meta": "fold 0"}
    c = clone_batch(batch)
    assert isinstance(c["pair"], Batch) and isinstance(c["list"], list) and c["meta"] == "fold 0"
    assert torch.equal(c["pair"].x, batch["pair"].x) and not c["pair"].x.requires_grad
    assert c["pair"].x.data_ptr() != batch["pair"].x.data_ptr()
    batch["list"][0].add_(1.0)  # changing the original after the snapshot...
    assert c["list"][0].item() == 1.0  # ...leaves the copy as it was
