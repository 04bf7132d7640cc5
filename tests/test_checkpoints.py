"""The `checkpoint-N/` convention every trainer shares: listing, --resume, pruning, atomic saving."""

from __future__ import annotations

import pytest

from lesiongen.errors import InputError
from lesiongen.utils import checkpoints


def _make(folder, step, complete=True):
    (folder / f"checkpoint-{step}").mkdir(parents=True)
    if complete:
        (folder / f"checkpoint-{step}" / checkpoints.STATE_FILE).write_text('{"step": %d}' % step)


def test_checkpoints_listed_resolved_and_pruned(tmp_path):
    for step in (2, 10, 4):
        _make(tmp_path, step)
    _make(tmp_path, 12, complete=False)  # no state file: an unfinished write is never "latest"
    assert [checkpoints.checkpoint_step(p) for p in checkpoints.list_checkpoints(tmp_path)] == [2, 4, 10]
    assert checkpoints.resolve_resume(tmp_path, "latest").name == "checkpoint-10"
    assert checkpoints.resolve_resume(tmp_path, "checkpoint-4").name == "checkpoint-4"
    assert checkpoints.resolve_resume(tmp_path / "empty", "latest") is None
    assert checkpoints.read_state(tmp_path / "checkpoint-4") == {"step": 4}
    with pytest.raises(InputError, match="--resume checkpoint-12: no complete checkpoint"):
        checkpoints.resolve_resume(tmp_path, "checkpoint-12")
    checkpoints.prune_checkpoints(tmp_path, 2)
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-10"]


def test_accelerate_checkpoint_is_renamed_into_place_only_when_complete(tmp_path):
    import torch
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    for step in (1, 2, 3):
        folder = checkpoints.save_accelerate_checkpoint(
            accelerator, tmp_path, step, {"step": step}, total_limit=2,
            add_files=lambda tmp: (tmp / "extra.txt").write_text("best"))
    assert folder == tmp_path / "checkpoint-3"
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert (folder / "extra.txt").read_text() == "best"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial folders left
    assert model is not None


def test_a_checkpoint_resumes_only_on_the_process_count_that_wrote_it(tmp_path):
    import torch
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    accelerator.prepare(torch.nn.Linear(2, 2))
    folder = checkpoints.save_accelerate_checkpoint(accelerator, tmp_path, 1, {"step": 1}, total_limit=None)
    assert checkpoints.saved_process_count(folder) == 1
    checkpoints.check_process_count(folder, 1)
    with pytest.raises(InputError, match=r"checkpoint-1 was written by 1 process, but this run has 4: .* Resume on 1 "
                                         r"\(without `accelerate launch`"):
        checkpoints.check_process_count(folder, 4)
    # A checkpoint from before processes.json: accelerate's RNG files, one per process, tell the count.
    (folder / checkpoints.PROCESSES_FILE).unlink()
    (folder / "random_states_1.pkl").write_bytes(b"")
    assert checkpoints.saved_process_count(folder) == 2
    with pytest.raises(InputError, match=r"written by 2 processes, but this run has 1: .* Resume on 2 "
                                         r"\(`accelerate launch --num_processes 2"):
        checkpoints.check_process_count(folder, 1)
    for rng in folder.glob("random_states_*.pkl"):
        rng.unlink()
    assert checkpoints.saved_process_count(folder) is None  # nothing says: nothing to refuse
    checkpoints.check_process_count(folder, 3)


def test_weights_written_into_our_folders_are_readable_as_the_umask_allows(tmp_path):
    """safetensors 0.8 writes 0600 files; a base or checkpoint another user (or container) cannot read is
    useless, so folder writers give every file the umask's read bits."""
    import os
    import stat

    import torch
    from safetensors.torch import save_file

    from lesiongen.utils.atomic import atomic_dir

    umask = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "weights") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
            (tmp / "nested").mkdir()
            save_file({"w": torch.zeros(2)}, str(tmp / "nested" / "shard.safetensors"))
        for path in ("model.safetensors", "nested/shard.safetensors"):
            assert stat.S_IMODE(os.stat(tmp_path / "weights" / path).st_mode) == 0o644
    finally:
        os.umask(umask)
