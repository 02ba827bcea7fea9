"""Training checkpoints that survive: atomic folders, exact resume, graceful interruption.

A checkpoint is a folder `output_dir/checkpoint-<update>/` holding
- the policy as `Policy.save` writes it (model or merged model + `adapter/`, value head, `critic/`), so a
  checkpoint is also a usable model folder;
- `optimizer.pt`, `scheduler.pt`: optimiser and LR-scheduler state dicts (a stage without a scheduler has none);
- `trainer_state.json`: update counter, data position, KL controller state, metrics history and whatever
  else the stage needs to continue exactly;
- `rng_state_<rank>.pth`: python, numpy, torch (and CUDA) generator states, one file per process;
- `config.yaml`: the resolved config of the run that wrote it;
- `checkpoint_complete`: the completion marker, written last.

A sharded run's checkpoint (`--fsdp full_shard`) holds the trainable weights and the optimiser state as
`sharded/` (torch.distributed.checkpoint: one file per process plus metadata, tensors only; the optimiser's
param_groups as JSON; loadable at any world size) instead of a model folder and `optimizer.pt`; every process writes
its shards to `checkpoint-<update>.tmp-shards`, which the main process moves into the atomic folder. Resuming checks
every pickled file first: `.metadata` with a restricted unpickler, the rest with `torch.load(weights_only=True)`.

It is written to `checkpoint-<update>.tmp-<pid>` and renamed into place, and only folders with the marker
count, so a run killed mid-write never leaves a folder that resume would pick up.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import signal
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from rlgen.errors import UserError

MARKER = "checkpoint_complete"
CONFIG_FILE = "config.yaml"
# Options a resumed run may change: how long it runs and what it saves, logs and evaluates along the way. Any
# other change (seed, data, model, hyperparameters) would silently continue a different run.
RESUME_MAY_CHANGE = ("max_steps", "save_steps", "save_total_limit", "output_dir", "overwrite_output_dir",
                     "resume_from_checkpoint", "report_to", "threads", "skip_nonfinite", "eval_steps", "evaluate")
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
SHARDED_DIR = "sharded"
_NAME = re.compile(r"checkpoint-(\d+)")


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM: the current update finished and a checkpoint was written. The CLI exits 128 + signal.
    `after` names the finished unit of work when it is not an update (e.g. SeqGAN's "D pre-training round 3")."""

    def __init__(self, signum: int, update: int, checkpoint: Path, after: str = ""):
        self.signum, self.update, self.checkpoint = signum, update, Path(checkpoint)
        self.exit_code = 128 + signum  # 130 for SIGINT, 143 for SIGTERM (the shell convention)
        name = signal.Signals(signum).name
        super().__init__(f"{name} received: stopped after {after or f'update {update}'}, checkpoint saved; resume "
                         f"by running the same command with --resume_from_checkpoint {self.checkpoint}")


class NonFiniteError(UserError):
    """A non-finite loss, reward or gradient norm; the message names the update and the quantity."""


# ---- signals --------------------------------------------------------------------------------------------


class StopSignals:
    """Context manager: the first SIGINT/SIGTERM only sets `signum` (the loop checks it between updates) and,
    given a `notice` (what the run does now), says so on stderr at once; a second one stops at once
    (KeyboardInterrupt / the default SIGTERM action). Previous handlers come back on exit. Outside the main
    thread it does nothing (signal handlers can only be set there).

    Under a launcher (torchrun, `accelerate launch`: TORCHELASTIC_RUN_ID is set) a Ctrl-C reaches each process
    twice, from the terminal and forwarded by the launcher's agent: the same signal again within `FORWARD_S`
    seconds is that copy, not a second Ctrl-C."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    FORWARD_S = 2.0

    def __init__(self, notice: str = ""):
        self.signum: int | None = None
        self.notice = notice
        self._previous: dict = {}
        self._at = 0.0

    def _handle(self, signum, frame):
        if (self.signum == signum and "TORCHELASTIC_RUN_ID" in os.environ
                and time.monotonic() - self._at < self.FORWARD_S):
            return
        if self.signum is not None:  # second signal: give up on the graceful stop
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        self.signum, self._at = signum, time.monotonic()
        if self.notice:  # os.write: print() may be inside a write to the same stream that this handler interrupts
            os.write(2, f"\n[rlgen] {signal.Signals(signum).name} received: {self.notice}; send it again to stop at "
                        "once\n".encode())

    def __enter__(self):
        try:
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread
            self._previous.clear()
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False


# ---- RNG ------------------------------------------------------------------------------------------------


def rng_state() -> dict:
    """This process's generator states (python, numpy, torch CPU, every CUDA device)."""
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def preserved_rng():
    """This process's generator states restored on exit, so that what draws random numbers inside (an evaluation
    along training) leaves the training's random streams as they were."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


# ---- folders --------------------------------------------------------------------------------------------


def complete_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(update, folder) of every complete `checkpoint-N` (marker present), oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _NAME.fullmatch(path.name)
        if match and path.is_dir() and (path / MARKER).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def find_checkpoint(spec: str, output_dir: str | Path) -> Path:
    """`latest` (the highest complete checkpoint in output_dir) or a checkpoint folder; UserError otherwise."""
    if spec == "latest":
        found = complete_checkpoints(output_dir)
        if not found:
            raise UserError(f"resume_from_checkpoint latest: no complete checkpoint-N folder in {output_dir}")
        return found[-1][1]
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise UserError(f"resume_from_checkpoint: checkpoint folder {spec} does not exist")
    if not (path / MARKER).is_file() or not (path / STATE_FILE).is_file():
        raise UserError(f"resume_from_checkpoint: {spec} is not a complete checkpoint (no {MARKER} marker)")
    return path


def check_resume_config(folder: Path, cfg) -> None:
    """UserError naming the options `cfg` changes from the checkpoint's `config.yaml` (RESUME_MAY_CHANGE excepted);
    options the checkpoint's config does not have (added since) are not compared."""
    import yaml

    from rlgen.config import to_dict

    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"resume_from_checkpoint: {folder} has no {CONFIG_FILE}")
    saved = yaml.safe_load(path.read_text()) or {}
    now = to_dict(cfg)
    changed = [k for k in now if k in saved and k not in RESUME_MAY_CHANGE and saved[k] != now[k]]
    if changed:
        diffs = "; ".join(f"{k}: {saved[k]!r} there, {now[k]!r} now" for k in changed)
        raise UserError(f"resume_from_checkpoint: {folder} was written with other settings ({diffs}); resume with "
                        "that run's settings (only max_steps, save_steps, save_total_limit, report_to, threads, "
                        "skip_nonfinite and the evaluations along training may change) or start a new run")


def remove_stale_temporaries(output_dir: str | Path) -> None:
    """Delete `checkpoint-N.tmp-<pid>` folders left by killed runs."""
    folder = Path(output_dir)
    if folder.is_dir():
        for path in folder.glob("checkpoint-*.tmp-*"):
            shutil.rmtree(path, ignore_errors=True)


def remove_checkpoints(output_dir: str | Path) -> None:
    """Delete every checkpoint-N folder (a fresh run over an old one with --overwrite_output_dir)."""
    folder = Path(output_dir)
    if folder.is_dir():
        for path in folder.iterdir():
            if _NAME.fullmatch(path.name) and path.is_dir():
                shutil.rmtree(path)


def write_atomically(output_dir: str | Path, update: int, write: Callable[[Path], None], keep: int) -> Path:
    """`write(tmp)` into `checkpoint-<update>.tmp-<pid>`, add the marker, rename to `checkpoint-<update>`,
    then delete all but the newest `keep` complete checkpoints (keep <= 0: keep all)."""
    output_dir = Path(output_dir)
    target = output_dir / f"checkpoint-{update}"
    tmp = output_dir / f"{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        (tmp / MARKER).write_text(f"update {update}\n")
        if target.exists():  # from an earlier timeline (resumed from an older checkpoint): replace it
            old = output_dir / f"{target.name}.tmp-{os.getpid()}-old"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep > 0:
        for _, path in complete_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
    return target


# ---- contents -------------------------------------------------------------------------------------------


def save_training_state(folder: Path, policy, optimizer, scheduler, state: dict, rng_states: list[dict]) -> None:
    """Everything but the config: policy, optimiser, scheduler (None: none), trainer state, one RNG file per
    process."""
    import torch

    policy.save(folder)
    torch.save(optimizer.state_dict(), folder / OPTIMIZER_FILE)
    if scheduler is not None:
        torch.save(scheduler.state_dict(), folder / SCHEDULER_FILE)
    (folder / STATE_FILE).write_text(json.dumps(state))
    for rank, rng in enumerate(rng_states):
        torch.save(rng, folder / f"rng_state_{rank}.pth")


def stage_sharded(output_dir: Path, update: int, policy, optimizer) -> Path:
    """Collective: every process writes its shards of the trainable weights and optimiser state to
    `checkpoint-<update>.tmp-shards` (removed as stale by `remove_stale_temporaries` if never moved)."""
    import torch.distributed as dist

    from rlgen.distributed import save_sharded

    staged = Path(output_dir) / f"checkpoint-{update}.tmp-shards"
    if dist.get_rank() == 0:
        shutil.rmtree(staged, ignore_errors=True)
    dist.barrier()
    save_sharded(staged, policy, optimizer)
    dist.barrier()
    return staged


def save_sharded_training_state(folder: Path, staged: Path, scheduler, state: dict, rng_states: list[dict]) -> None:
    """`save_training_state` for a sharded run: the staged shards moved in as `sharded/`."""
    import torch

    os.replace(staged, folder / SHARDED_DIR)
    torch.save(scheduler.state_dict(), folder / SCHEDULER_FILE)
    (folder / STATE_FILE).write_text(json.dumps(state))
    for rank, rng in enumerate(rng_states):
        torch.save(rng, folder / f"rng_state_{rank}.pth")


def load_policy_weights(folder: Path, policy) -> None:
    """Load a checkpoint's trainable weights into `policy` in place (its reference model stays as it is)."""
    import torch
    from safetensors.torch import load_file

    from rlgen.policy import VALUE_HEAD_FILE

    if policy.is_peft:
        from peft import set_peft_model_state_dict

        adapter = folder / "adapter" / "adapter_model.safetensors"
        set_peft_model_state_dict(policy.model, load_file(str(adapter)))
    else:
        from transformers import AutoModelForCausalLM

        saved = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        policy.model.load_state_dict(saved.state_dict())
    if policy.value_head is not None:  # an estimator without a critic has none (rlgen.estimators.needs_critic)
        policy.value_head.load_state_dict(load_file(str(folder / VALUE_HEAD_FILE)))
    if policy.critic is not None:
        from transformers import AutoModel

        policy.critic.load_state_dict(AutoModel.from_pretrained(folder / "critic", dtype=torch.float32).state_dict())


def load_tensors(path: Path, what: str):
    """`torch.load` of a checkpoint file rlgen wrote with `torch.save` (tuples, lists, dicts, numbers, tensors):
    a planted pickle's callables are refused, never run, with a UserError naming the file."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line]
        reason = found[0].rstrip(".") if found else "not tuples, lists, numbers and tensors"
        raise UserError(f"resume_from_checkpoint: {path} is not {what} rlgen wrote, refusing to load it "
                        f"({reason})") from None


# Adam/AdamW flags that say how the optimiser runs on this run's device, not what it learnt: a checkpoint
# written on CUDA (capturable: the step counter on the GPU, for D's CUDA graph) must not impose them on a CPU
# run (Adam refuses capturable steps there), nor a CPU one take the graphed step from a CUDA run.
DEVICE_FLAGS = ("capturable", "fused", "foreach")


def load_optimizer_state(optimizer, path: Path) -> None:
    """Load an optimiser state file into `optimizer`, keeping the device flags it was built with; its step
    counters then lie where those flags want them (on the parameters' device for capturable or fused)."""
    state = load_tensors(path, "an optimiser state")
    for saved, group in zip(state.get("param_groups", []), optimizer.param_groups):
        saved.update({k: group[k] for k in DEVICE_FLAGS if k in group})
    optimizer.load_state_dict(state)


def load_training_state(folder: Path, policy, optimizer, scheduler, rank: int) -> dict:
    """Restore policy, optimiser, scheduler (None: none) and this process's RNG; return the trainer state."""
    rng_file = folder / f"rng_state_{rank}.pth"
    if not rng_file.is_file():
        raise UserError(f"resume_from_checkpoint: {folder} has no {rng_file.name} (written by fewer processes?)")
    load_policy_weights(folder, policy)
    load_optimizer_state(optimizer, folder / OPTIMIZER_FILE)
    if scheduler is not None:
        scheduler.load_state_dict(load_tensors(folder / SCHEDULER_FILE, "a scheduler state"))
    set_rng_state(load_tensors(rng_file, "an RNG state"))
    return json.loads((folder / STATE_FILE).read_text())


def load_sharded_training_state(folder: Path, policy, optimizer, scheduler, rank: int, world: int) -> dict:
    """`load_training_state` for a sharded run, at any world size. At the writer's world size the resume is exact;
    at another, torch.distributed.checkpoint reshards weights and optimiser state, while the random streams stay
    this run's own (seed + rank) and the prompts per update follow the new world size: it continues, not bit-exact."""
    from rlgen.distributed import load_sharded

    state = json.loads((folder / STATE_FILE).read_text())
    load_sharded(folder / SHARDED_DIR, policy, optimizer)
    scheduler.load_state_dict(load_tensors(folder / SCHEDULER_FILE, "a scheduler state"))
    if state["world_size"] == world:
        set_rng_state(load_tensors(folder / f"rng_state_{rank}.pth", "an RNG state"))
    elif rank == 0:
        print(f"[rlgen] resumed {folder} (written by {state['world_size']} processes) on {world}: weights and "
              "optimiser state resharded; random streams and prompts per update differ from an uninterrupted run "
              "(it continues, not bit-exact)", flush=True)
    return state
