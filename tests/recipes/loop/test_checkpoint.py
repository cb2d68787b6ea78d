"""Loading checkpoints runs no code from the file: the recipe's .pt files (weights-only
unpickler) and the metadata of FSDP's torch.distributed.checkpoint folders (an allow-list)."""

from __future__ import annotations

import pickle
import shutil
import warnings

import pytest
import torch

from recipes.memdlm.errors import UserError
from recipes.memdlm.loop import checkpoint as ckpt


class RunsCode:
    """Unpickled by a full unpickler, this copies this file to `marker`: code runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (shutil.copyfile, (__file__, self.marker))


def test_what_the_recipe_saves_loads_back_and_a_payload_is_refused(tmp_path):
    state = {
        "model": {"w": torch.randn(3, 2)},
        "generators": {"data": torch.Generator().manual_seed(1).get_state()},
        "counters": {"step": 7, "tokens": 1.5e3, "names": ["a", "b"], "none": None},
    }
    ckpt.save(tmp_path / "good.pt", state)
    back = ckpt.load(tmp_path / "good.pt")
    assert torch.equal(back["model"]["w"], state["model"]["w"])
    assert back["counters"] == state["counters"]
    marker = tmp_path / "code-ran"
    torch.save({"model": {}, "x": RunsCode(marker)}, tmp_path / "bad.pt")
    for mmap in (False, True):
        with pytest.raises(UserError, match="was refused: it holds Python objects"):
            ckpt.load(tmp_path / "bad.pt", mmap=mmap)
    assert not marker.exists()
    torch.load(tmp_path / "bad.pt", weights_only=False)  # the oracle: unsafely, it does run
    assert marker.exists()


def dcp_folder(tmp_path):
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    with warnings.catch_warnings():  # no process group: DCP warns and saves as one rank
        warnings.simplefilter("ignore")
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(tmp_path / "dcp"))
    return tmp_path / "dcp", model.state_dict()


def test_dcp_metadata_is_read_without_code_and_loads_the_same_tensors(tmp_path):
    import torch.distributed.checkpoint as dcp

    folder, saved = dcp_folder(tmp_path)
    target = {"model": {k: torch.zeros_like(v) for k, v in saved.items()}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(target, storage_reader=ckpt.dcp_reader(folder))
    for key, value in saved.items():
        assert torch.equal(target["model"][key], value)
    marker = tmp_path / "code-ran"
    with open(folder / ".metadata", "wb") as handle:
        pickle.dump(RunsCode(marker), handle)
    with pytest.raises(UserError, match="was refused"):
        ckpt.dcp_reader(folder).read_metadata()
    assert not marker.exists()
