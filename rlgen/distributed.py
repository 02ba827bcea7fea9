"""Sharded PPO on PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`): sharding, rollouts, checkpoints.

`--fsdp full_shard` shards the policy (with its value head), the separate critic and the frozen reference over
the processes of any launcher (`torchrun`, `accelerate launch` with a DDP config): each decoder layer is one
`fully_shard` unit (the layer class is the model's own `_no_split_modules`), then the rest of each model. Every
process keeps 1/world of each weight, gradient and Adam moment; a layer's whole weights exist only while it runs.

- Rollouts: generation runs on whole weights. `gathered` all-gathers the policy once for the rollout and
  reshards after it (peak: the whole policy in the compute dtype on every process, for the rollout only). Each
  process samples its own prompts and stops when its own completions end, so generation must not depend on the
  other processes: with per-layer all-gathers inside generate, processes that take different numbers of steps
  would wait on each other forever.
- Precision: on CUDA with dtype bf16/fp16, `MixedPrecisionPolicy` computes in that dtype with float32 master
  weights and float32 gradient reductions; on the CPU everything is float32.
- Checkpoints: model and optimiser through `torch.distributed.checkpoint` (one file per process plus metadata),
  so a checkpoint written by N processes loads into M (DCP reshards on load). Only tensors go through DCP (it
  unpickles anything else with weights_only=False), and `.metadata` is unpickled with only DCP's classes allowed.
- The final model: the full state dict gathered on rank 0 and loaded into an ordinary `Policy` there.

accelerate's FSDP plugin does not engage on CPU processes (they run unsharded; TRL's trainers even as
independent single-process copies), which `refuse_unsharded_launch` turns into a one-line error.
"""

from __future__ import annotations

import os
import pickle
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from rlgen.errors import UserError


def refuse_unsharded_launch(stage: str) -> None:
    """A launch whose accelerate config asks for sharding that would not happen: accelerate's FSDP or DeepSpeed
    plugin on CPU processes (accelerate then sets up plain CPU processes; TRL's trainers ran as N independent
    single-process copies, issue 20)."""
    if torch.cuda.is_available():
        return
    for env, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(env, "").lower() in ("true", "1"):
            fix = ("launch `torchrun --nproc_per_node N -m rlgen ppo --fsdp full_shard ...` instead" if stage == "ppo"
                   else "use the DDP config (experiments/accelerate/ddp_multi_gpu.yaml) on CPU processes")
            raise UserError(f"{stage}: accelerate's {name} config does not shard on CPU processes (they would "
                            f"train unsharded); {fix}")


def ensure_process_group(device: torch.device) -> bool:
    """The default process group; a one-process one (gloo/nccl over an in-memory store) when no launcher started
    one, so FSDP also runs in a single process (e.g. resuming a sharded checkpoint on one machine).
    Returns whether this call created it (then `destroy_process_group` is the caller's)."""
    if dist.is_initialized():
        return False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1)
    return True


def layer_classes(model) -> set[type]:
    """The classes of `model`'s decoder layers: those its `_no_split_modules` names (transformers' own list of
    modules that must stay whole; accelerate's FSDP auto-wrap uses it too)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    found = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not found:
        raise UserError(f"fsdp: {type(model).__name__} names no decoder layer class (_no_split_modules is "
                        f"{sorted(names) or 'empty'}); sharding it per layer is not supported")
    return found


def _shard_model(model, mesh, mp_policy) -> None:
    from torch.distributed.fsdp import fully_shard

    classes = tuple(layer_classes(model))
    for module in list(model.modules()):
        if isinstance(module, classes):
            fully_shard(module, mesh=mesh, mp_policy=mp_policy)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy)


def shard_policy(policy, device: torch.device, compute_dtype: torch.dtype) -> None:
    """Shard the policy's models in place over all processes; create the optimiser after this.

    The transformers model under any PEFT wrapper is the root (generate calls it, not the wrapper), the critic
    and reference are roots of their own, and the value head is one unit (float32, no mixed precision).
    Collective: every process calls it with the same model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # Like DDP, every process starts from rank 0's trainable weights (a LoRA adapter's init is random and each
    # process seeds seed + rank); fully_shard keeps each process's own slice, so they must agree first.
    if dist.get_world_size() > 1:
        with torch.no_grad():
            for param in policy.parameters():
                if param.requires_grad:
                    flat = param.data.to(device)
                    dist.broadcast(flat, src=0)
                    param.data.copy_(flat)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mixed = compute_dtype != torch.float32 and device.type == "cuda"
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if mixed else MixedPrecisionPolicy()
    for model in (policy.base_model, policy.critic, policy.ref_model):
        if model is not None:
            _shard_model(model, mesh, mp)
    if policy.value_head is not None:
        fully_shard(policy.value_head, mesh=mesh)
    policy.sharded, policy.compute_dtype = True, compute_dtype if mixed else torch.float32


@contextmanager
def gathered(model):
    """Whole weights of an FSDP `model` for the block (one all-gather per unit), resharded after it; the block
    runs no collective on `model`, so processes may call it different numbers of times (generation)."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        if unit is not model:  # the root keeps its own setting (it does not reshard after forward)
            unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            if unit is not model:
                unit.set_reshard_after_forward(True, recurse=False)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor; a plain tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def local_bytes(tensors) -> int:
    return sum(local_tensor(t).numel() * t.element_size() for t in tensors if t is not None)


def training_bytes(params: list, optimizer) -> dict[str, int]:
    """Bytes this process holds of the trainable parameters, their gradients and the optimiser state, counted
    from the local shards."""
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return {"params": local_bytes(params), "grads": local_bytes([p.grad for p in params]),
            "optimizer": local_bytes(state)}


def shard_summary(policy) -> str:
    """'rank r of w holds X of Y parameter elements' (policy, value head, critic, reference)."""
    params = list(policy.parameters())
    held = sum(local_tensor(p).numel() for p in params)
    return (f"rank {dist.get_rank()} of {dist.get_world_size()} holds {held} of {sum(p.numel() for p in params)} "
            "parameter elements")


def clip_grad_norm(params: list, max_norm: float) -> torch.Tensor:
    """Clip sharded gradients by their global norm (torch reduces the shards' norms); the norm as a tensor."""
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, **kw)  # what trains: not the reference, not LoRA's base


# The optimiser's param_groups (hyperparameters and parameter names) go to a JSON file beside the shards: DCP
# stores non-tensor items as pickles and its default planner loads them with torch.load(weights_only=False).
PARAM_GROUPS_FILE = "optimizer_param_groups.json"
METADATA_FILE = ".metadata"


def save_sharded(folder: Path, policy, optimizer) -> None:
    """Every process writes its shards of the trainable weights and the optimiser state to `folder` (DCP, tensors
    only); the main process adds the optimiser's param_groups as JSON."""
    import json

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(policy, optimizer, options=_options())
    dcp.save({"model": model_state, "optimizer": {"state": optim_state["state"]}}, checkpoint_id=folder)
    if dist.get_rank() == 0:
        (Path(folder) / PARAM_GROUPS_FILE).write_text(json.dumps(optim_state["param_groups"]))


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's `.metadata` allowing only DCP's metadata classes, torch.Size, dtypes, layouts and paths (what
    `dcp.save` writes); any other global (a planted `os.system`) is refused before anything is called."""

    ALLOWED = {("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")} | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
        ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, not one of DCP's metadata classes")


def _refuse(path: Path, what: str, reason: str) -> UserError:
    return UserError(f"resume_from_checkpoint: {path} is not {what} rlgen wrote, refusing to load it ({reason})")


def check_sharded(folder: Path):
    """The checked metadata of `save_sharded`'s `folder`: `.metadata` unpickled with `_MetadataUnpickler`, listing
    only tensors stored in files of `folder` itself; UserError naming the file otherwise."""
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        raise UserError(f"resume_from_checkpoint: {folder} has no {METADATA_FILE}")
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as e:
        raise _refuse(path, "a sharded checkpoint's metadata", str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    if not isinstance(metadata, Metadata):
        raise _refuse(path, "a sharded checkpoint's metadata", f"it holds a {type(metadata).__name__}")
    for key, item in metadata.state_dict_metadata.items():
        if not isinstance(item, TensorStorageMetadata):  # DCP would torch.load it with weights_only=False
            raise _refuse(path, "a sharded checkpoint's metadata", f"it lists {key!r} as a non-tensor item")
    for info in (metadata.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise _refuse(path, "a sharded checkpoint's metadata", f"it points outside {folder}: {name!r}")
    return metadata


def _checked_reader(folder: Path, metadata):
    """A DCP reader that serves the checked `metadata` (never unpickling `.metadata` again) and turns a shard that
    is not a tensor (weights_only refuses it) into a UserError naming the file."""
    from torch.distributed.checkpoint import FileSystemReader

    class CheckedReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            return metadata

        def _slice_file(self, file, sinfo):
            self.reading = sinfo.relative_path
            return super()._slice_file(file, sinfo)

        def read_data(self, plan, planner):
            try:
                return super().read_data(plan, planner)
            except pickle.UnpicklingError as e:
                found = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line]
                raise _refuse(Path(folder) / self.reading, "a shard",
                              found[0].rstrip(".") if found else "not a tensor") from None

    return CheckedReader(folder)


def load_sharded(folder: Path, policy, optimizer) -> None:
    """Load `save_sharded`'s files into this run's shards, whatever the world size that wrote them. Every pickled
    file is checked first (`check_sharded`; the shards load with weights_only=True): a planted one is refused."""
    import json

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = Path(folder)
    metadata = check_sharded(folder)
    groups_file = folder / PARAM_GROUPS_FILE
    if not groups_file.is_file():
        raise UserError(f"resume_from_checkpoint: {folder} has no {PARAM_GROUPS_FILE} (written by an older rlgen?)")
    model_state, optim_state = get_state_dict(policy, optimizer, options=_options())
    state = {"model": model_state, "optimizer": {"state": optim_state["state"]}}
    try:
        dcp.load(state, storage_reader=_checked_reader(folder, metadata))
    except CheckpointException as e:
        refused = [exc for exc, _ in e.failures.values() if isinstance(exc, UserError)]
        if refused:
            raise refused[0] from None
        raise
    try:
        groups = json.loads(groups_file.read_text())
    except ValueError as e:
        raise UserError(f"resume_from_checkpoint: {groups_file} is not JSON ({e})") from None
    for saved, group in zip(groups, optim_state["param_groups"]):  # JSON made the tuples (betas) lists
        saved.update({k: tuple(v) for k, v in saved.items() if isinstance(group.get(k), tuple)})
    # not strict: the frozen weights are not in the checkpoint (dcp.load already failed on any trainable one missing)
    set_state_dict(policy, optimizer, model_state_dict=state["model"],
                   optim_state_dict={"state": state["optimizer"]["state"], "param_groups": groups},
                   options=_options(strict=False))


def unsharded_copy(policy, load_plain):
    """Collective: gather the trainable weights; on rank 0, `load_plain()` (an ordinary Policy without reference)
    takes them and is returned (None elsewhere)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(policy, options=_options(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    plain = load_plain()
    result = plain.load_state_dict(full, strict=False)
    trainable = {name for name, p in plain.named_parameters() if p.requires_grad}
    mismatched = result.unexpected_keys + [k for k in result.missing_keys if k in trainable]
    if mismatched:
        raise RuntimeError(f"the gathered weights do not fit the plain policy: {mismatched[:3]}")
    return plain
