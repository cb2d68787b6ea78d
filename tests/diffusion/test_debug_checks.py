"""The value checks of the training-path functions are opt-in (`dd.debug_checks`): switched off,
a call reads nothing back to the host (counted with a `TorchFunctionMode`) and lets a bad value
through; switched on, the same call raises the documented error."""

from __future__ import annotations

import pytest
import torch

import diffusion as dd
from benchmarks.count_host_syncs import count_syncs

MASK = 9
S = dd.LinearSchedule()


def _loss_args(**change):
    logits = torch.randn(2, 3, 10, dtype=torch.float64)
    x0 = torch.tensor([[0, 1, 2], [3, 4, 5]])
    mask = torch.tensor([[False, True, True], [True, False, True]])
    maskable = torch.tensor([[False, True, True], [True, True, True]])
    args = dict(
        logits=logits, x0=x0, mask=mask, t=torch.tensor([0.5, 0.25], dtype=torch.float64),
        schedule=S, maskable=maskable,
    )  # fmt: skip
    args.update(change)
    return args


def _loss(static=None, **change):
    a = _loss_args(**change)
    logits, x0, mask, t = (a.pop(k) for k in ("logits", "x0", "mask", "t"))
    return lambda: dd.masked_diffusion_loss(logits, x0, mask, t, static_shapes=static, **a)


def _loss_from_hidden(**change):
    a = _loss_args(**change)
    hidden, weight = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(10, 4).double()
    del a["logits"]
    x0, mask, t = (a.pop(k) for k in ("x0", "mask", "t"))
    return lambda: dd.masked_diffusion_loss_from_hidden(
        hidden, weight, x0, mask, t, static_shapes=True, backend="reference", **a
    )


def _corrupt(t=(0.5, 0.5), x0=None):
    x0 = torch.zeros(2, 5, dtype=torch.long) if x0 is None else x0
    return lambda: dd.corrupt(x0, torch.tensor(t), mask_id=MASK, schedule=S)


def _nested(mask=None, ratio=0.5, maskable=None):
    mask = torch.zeros(2, 4, dtype=torch.bool) if mask is None else mask
    return lambda: dd.nested_mask(mask, ratio, maskable=maskable)


BAD = [
    (_nested(ratio=torch.tensor([0.5, -1.0])), "ratio must be finite"),
    (
        _nested(torch.ones(2, 4, dtype=torch.bool), 0.5, torch.zeros(2, 4, dtype=torch.bool)),
        "subset",
    ),
    (_loss(static=True, t=torch.tensor([0.0, 0.5], dtype=torch.float64)), r"t must lie in"),
    (_loss(static=True, mask=torch.ones(2, 3, dtype=torch.bool)), "outside maskable"),
    (_loss(static=True, mask_id=3), "x0 contains mask_id=3"),
    (_loss_from_hidden(t=torch.tensor([2.0, 0.5], dtype=torch.float64)), r"t must lie in"),
]


def test_corrupt_refuses_t_outside_the_unit_interval_always():
    """shared/DESIGN.md's contract: `dd.corrupt` with t outside [0, 1] is a ValueError with or
    without the debug switch; that check is its one read of values (t's B entries)."""
    assert not dd.debug_checks_enabled()
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        _corrupt(t=(0.5, 1.5))()
    assert count_syncs(_corrupt()).per_step() == [1]


def test_corrupt_checks_x0_for_mask_id_only_under_the_switch():
    call = _corrupt(x0=torch.full((2, 5), MASK))
    call()  # off: no error, and no read beyond t's range check
    assert count_syncs(call).per_step() == [1]
    with dd.debug_checks(), pytest.raises(ValueError, match="x0 contains mask_id"):
        call()


@pytest.mark.parametrize(("call", "match"), BAD)
def test_off_the_bad_value_passes_without_a_host_read_on_it_raises(call, match):
    assert not dd.debug_checks_enabled()
    report = count_syncs(call)
    assert report.per_step() == [0], report.by_site()
    with dd.debug_checks(), pytest.raises(ValueError, match=match):
        call()
    assert not dd.debug_checks_enabled()  # the block restored the default


def test_the_switch_is_a_setting_and_a_block():
    previous = dd.debug_checks(True)
    try:
        assert dd.debug_checks_enabled()
        with dd.debug_checks(False):
            assert not dd.debug_checks_enabled()
        assert dd.debug_checks_enabled()
    finally:
        dd.debug_checks(previous.previous)
    assert not dd.debug_checks_enabled()
    with pytest.raises(TypeError, match="enabled must be a bool"):
        dd.debug_checks("yes")


def test_static_shapes_gives_the_gathered_loss_and_gradient_without_a_host_read():
    args = _loss_args()
    logits = args.pop("logits").requires_grad_()
    x0, mask, t = args.pop("x0"), args.pop("mask"), args.pop("t")
    values = {}
    for static in (False, True):
        loss = dd.masked_diffusion_loss(logits, x0, mask, t, static_shapes=static, **args)
        (grad,) = torch.autograd.grad(loss, logits)
        values[static] = (loss, grad)
    torch.testing.assert_close(values[True], values[False], rtol=1e-12, atol=1e-12)
    gathered = count_syncs(lambda: dd.masked_diffusion_loss(logits, x0, mask, t, **args))
    static = count_syncs(
        lambda: dd.masked_diffusion_loss(logits, x0, mask, t, static_shapes=True, **args)
    )
    assert sum(gathered.per_step()) >= 1 and static.per_step() == [0]


def test_the_environment_variable_turns_the_checks_on():
    import subprocess
    import sys

    code = "import diffusion as dd; print(dd.debug_checks_enabled())"
    for value, expected in (("1", "True"), ("0", "False"), ("", "False")):
        env = {"DIFFUSION_DEBUG_CHECKS": value, "PATH": ""}
        env.update({k: v for k, v in __import__("os").environ.items() if k == "PYTHONPATH"})
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == expected
