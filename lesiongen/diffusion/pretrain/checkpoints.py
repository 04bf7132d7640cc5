"""Resumable pretraining checkpoints: `checkpoints/checkpoint-N/` with weight shards, optional optimizer
state and `trainer_state.json` (written last, so a folder without it is incomplete and ignored).

Weights are safetensors shards of at most `max_shard_mib` each (fp16 by default) so a long run can be
a chain of short jobs on machines that move only small files; the optimizer state is optional (a
resume without it restarts Adam's moments, nothing else). Nothing is pickled.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lesiongen.errors import InputError
from lesiongen.utils.atomic import atomic_dir, write_json
from lesiongen.utils.checkpoints import (
    PREFIX,
    STATE_FILE,
    list_checkpoints,
    prune_checkpoints,
    read_state,
    resolve_resume,
)

CHECKPOINTS_DIR = "checkpoints"
WEIGHTS_INDEX = "weights.safetensors.index.json"
OPTIMIZER_FILE = "optimizer.safetensors"


@dataclass
class TrainerState:
    stage: str = "vae"  # the stage to run next: "vae" or "unet" (its `step` steps already done)
    step: int = 0
    global_step: int = 0
    scaling_factor: float | None = None  # set when the VAE stage ends
    ema_step: int = 0
    optimizer_groups: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)  # last evaluation, carried into the final provenance
    planned_steps: dict = field(default_factory=dict)  # stage -> step count fitted to the time budget
    elapsed_s: float = 0.0  # training wall seconds up to this checkpoint, over all jobs of the run

    @classmethod
    def read(cls, checkpoint: Path) -> TrainerState:
        try:
            return cls(**read_state(checkpoint))
        except TypeError as err:
            raise InputError(f"{checkpoint / STATE_FILE}: not a pretraining checkpoint state ({err})") from err


def checkpoints_in(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    return list_checkpoints(run_dir / CHECKPOINTS_DIR)


def find_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """`latest` (None when the run has none yet), or a checkpoint folder (path or name)."""
    return resolve_resume(run_dir / CHECKPOINTS_DIR, resume)


_PIECE = "@@piece"  # `name@@piece3of5`: a slice along dim 0 of a tensor larger than one shard
_HEADER_ROOM = 64 << 10  # bytes kept free in each shard for the safetensors JSON header


def split_large(tensors: dict[str, torch.Tensor], max_bytes: int) -> dict[str, torch.Tensor]:
    """Tensors over `max_bytes` become slices along dim 0, so no shard has to exceed the limit."""
    out = {}
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes <= max_bytes or tensor.ndim == 0:
            out[key] = tensor
            continue
        pieces = torch.chunk(tensor, min(tensor.shape[0], math.ceil(nbytes / max_bytes)), dim=0)
        out.update({f"{key}{_PIECE}{i}of{len(pieces)}": p.contiguous() for i, p in enumerate(pieces)})
    return out


def join_pieces(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, pieces = {}, {}
    for key, tensor in tensors.items():
        if _PIECE in key:
            name, _, index = key.partition(_PIECE)
            pieces.setdefault(name, {})[int(index.split("of")[0])] = tensor
        else:
            out[key] = tensor
    for name, parts in pieces.items():
        out[name] = torch.cat([parts[i] for i in sorted(parts)], dim=0)
    return out


def plan_shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Greedy packing in key order (tensors must already fit one shard each, see `split_large`)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def check_checkpoint_size(num_parameters: int, dtype: torch.dtype, max_shard_mib: int, max_shards: int | None) -> None:
    """Fail before training, not at the first checkpoint, when the weights cannot fit the shard limits."""
    if max_shards is None:
        return
    nbytes = num_parameters * torch.finfo(dtype).bits // 8
    needed = math.ceil(nbytes / ((max_shard_mib << 20) - _HEADER_ROOM))
    if needed > max_shards:
        raise InputError(f"a checkpoint holds {num_parameters:,} weights ({nbytes / 2**20:.0f} MiB in {dtype}), more "
                         f"than max_shards={max_shards} x max_shard_mib={max_shard_mib}; use checkpoint_dtype float16, "
                         "a smaller preset, or raise the limits")


def save_checkpoint(run_dir: Path, state: TrainerState, tensors: dict[str, torch.Tensor], *,
                    optimizer: torch.optim.Optimizer | None, dtype: torch.dtype, max_shard_mib: int,
                    total_limit: int | None) -> Path:
    from safetensors.torch import save_file

    folder = run_dir / CHECKPOINTS_DIR / f"{PREFIX}{state.global_step}"
    weights = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
               for k, v in tensors.items()}
    room = (max_shard_mib << 20) - _HEADER_ROOM
    weights = split_large(weights, room)
    shards = plan_shards(weights, room)
    with atomic_dir(folder) as tmp:
        weight_map = {}
        for i, keys in enumerate(shards, start=1):
            name = f"weights-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: weights[k] for k in keys}, str(tmp / name))
            weight_map.update(dict.fromkeys(keys, name))
        write_json(tmp / WEIGHTS_INDEX, {"metadata": {"dtype": str(dtype).removeprefix("torch.")},
                                         "weight_map": weight_map})
        if optimizer is not None:
            flat, groups = flatten_optimizer_state(optimizer.state_dict())
            save_file(flat, str(tmp / OPTIMIZER_FILE))
            state.optimizer_groups = groups
        else:
            state.optimizer_groups = []
        write_json(tmp / STATE_FILE, asdict(state))
    prune_checkpoints(run_dir / CHECKPOINTS_DIR, total_limit)
    return folder


def load_checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index_file = folder / WEIGHTS_INDEX
    if not index_file.is_file():
        raise InputError(f"{folder}: no {WEIGHTS_INDEX}; the checkpoint is incomplete")
    index = json.loads(index_file.read_text(encoding="utf-8"))
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(str(folder / name)))
    missing = sorted(set(index["weight_map"]) - set(tensors))
    if missing:
        raise InputError(f"{folder}: weights {missing[:3]} listed in {WEIGHTS_INDEX} are missing from the shards")
    return join_pieces(tensors)


def load_optimizer_state(folder: Path, state: TrainerState) -> dict | None:
    """The optimizer state dict, or None when the checkpoint was saved without it."""
    from safetensors.torch import load_file

    path = folder / OPTIMIZER_FILE
    if not path.is_file() or not state.optimizer_groups:
        return None
    return unflatten_optimizer_state(load_file(str(path)), state.optimizer_groups)


def flatten_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], list]:
    flat = {}
    for index, per_param in state_dict["state"].items():
        for name, value in per_param.items():
            tensor = value if torch.is_tensor(value) else torch.tensor(value)
            flat[f"{index}.{name}"] = tensor.detach().cpu().contiguous()
    return flat, json.loads(json.dumps(state_dict["param_groups"]))


def unflatten_optimizer_state(flat: dict[str, torch.Tensor], groups: list) -> dict:
    state: dict[int, dict] = {}
    for key, tensor in flat.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = tensor
    return {"state": state, "param_groups": groups}
