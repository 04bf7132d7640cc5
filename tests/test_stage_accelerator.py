"""Stages of one process (the loop, the demo) each get an Accelerator with their own mixed precision."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from lesiongen.utils.distributed import stage_accelerator


@pytest.fixture
def fresh_state():
    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()  # later in-process stages start from nothing, as in a new process


def test_a_stage_may_change_the_precision_an_earlier_stage_chose(fresh_state):
    # On a GPU the loop's finetune resolves "auto" to bf16 while the demo's classifier says "no".
    first = stage_accelerator(mixed_precision="bf16")
    assert first.mixed_precision == "bf16"
    with pytest.raises(ValueError, match="already been initialized"):
        Accelerator(mixed_precision="no")  # what a plain Accelerator does: the reason for stage_accelerator
    second = stage_accelerator(mixed_precision="no", gradient_accumulation_steps=2)
    assert second.mixed_precision == "no" and second.gradient_accumulation_steps == 2
    assert second.device == first.device
    model = second.prepare(torch.nn.Linear(2, 2))
    with second.autocast():
        assert model(torch.ones(1, 2)).dtype == torch.float32  # no bf16 left over from the first stage
    assert stage_accelerator(mixed_precision="no").mixed_precision == "no"  # same precision: state kept
