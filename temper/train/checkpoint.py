"""Checkpoints that are atomic and hold everything needed to continue bit for bit.

A checkpoint is a directory `checkpoints/step_00000100/` with
  model.safetensors      every model tensor (temper names; tied tensors stored once); a run that
                         trains several named modules (`model={"policy": p, "value": v}`) has one
                         file per module instead: policy.safetensors, value.safetensors
  optimizer.safetensors  every optimiser state tensor, and `state.json` its groups
  rng.safetensors        torch (CPU and CUDA) generator states
  state.json             step, data position, Python and NumPy RNG states, the resolved config,
                         the module names (`modules`)
  state.safetensors      only when a stateful part's state holds tensors (a rollout buffer, a
                         generator state): each tensor under its path in the state
                         (`rollout/buffer/advantages`), and in state.json in its place
                         `{"__tensor__": path, "device": "cuda"}`; restored with its dtype,
                         shape and values, on the CPU if it was there, else on the run's device
It is written to a temporary directory, every file and the directory fsynced, and renamed
into place, so a crash, a power cut or a full disk never leaves a half-written checkpoint
that `resume=auto` could pick up; a checkpoint counts as valid only when every
safetensors header and `state.json` parse. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from temper.errors import TemperError
from temper.io import fsync_path, write_safetensors

STEP_DIR = re.compile(r"^step_(\d+)$")


# ----------------------------------------------------------------------------- tensors without pickle


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors with shared tensors (tied weights) stored once and their aliases in metadata."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_storage: dict[tuple, str] = {}
    for name, t in tensors.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in by_storage:
            aliases[name] = by_storage[key]
            continue
        by_storage[key] = name
        unique[name] = t.detach().contiguous().cpu()
    write_safetensors(unique, path, metadata={"aliases": json.dumps(aliases)})


def load_tensors(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    tensors = load_file(str(path), device=str(device))
    for name, target in aliases.items():
        tensors[name] = tensors[target]
    return tensors


# ----------------------------------------------------------------------------- named modules, tensors in state

TENSOR = "__tensor__"  # state.json's stand-in for a tensor kept in state.safetensors
RESERVED_FILES = ("optimizer", "rng", "state")
MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def named_modules(model: torch.nn.Module | dict[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
    """{file stem: module}: `model` for one module (model.safetensors, as ever), else the dict's names."""
    if isinstance(model, torch.nn.Module):
        return {"model": model}
    if not isinstance(model, dict) or not model:
        raise TemperError("the trained model is a module or a non-empty dict of named modules")
    for name, module in model.items():
        if not isinstance(name, str) or not MODULE_NAME.match(name) or name in RESERVED_FILES:
            raise TemperError(f"trained module name {name!r}: use letters, digits, _ or - (not "
                              f"{', '.join(RESERVED_FILES)}): it names the checkpoint file NAME.safetensors")
        if not isinstance(module, torch.nn.Module):
            raise TemperError(f"trained module {name!r} is a {type(module).__name__}, not a torch.nn.Module")
    return dict(model)


def _escape(key: str) -> str:  # JSON pointer's (RFC 6901): a '/' inside a key cannot fake a level
    return key.replace("~", "~0").replace("/", "~1")


def split_tensors(state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """(the state with each tensor replaced by `{"__tensor__": path, "device": type}`, {path: tensor}).
    Dicts and lists (tuples become lists, as in JSON) are walked to any depth."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if torch.is_tensor(value):
            tensors[path] = value.detach()
            return {TENSOR: path, "device": value.device.type}
        if isinstance(value, dict):
            return {k: walk(v, f"{path}/{_escape(str(k))}" if path else _escape(str(k))) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(value)]
        return value

    return walk(state, ""), tensors


def join_tensors(state: Any, tensors: dict[str, torch.Tensor], device: torch.device | str) -> Any:
    """`split_tensors` undone: a tensor saved from the CPU comes back on the CPU, one saved from an
    accelerator on `device` (this run's)."""
    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            if TENSOR in value and set(value) == {TENSOR, "device"}:
                tensor = tensors[value[TENSOR]]
                return tensor if value["device"] == "cpu" else tensor.to(device)
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    return walk(state)


# ----------------------------------------------------------------------------- optimiser and RNG state


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_files(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    meta = {"python": [version, list(internal), gauss],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# ----------------------------------------------------------------------------- save / find / load


def save_checkpoint(root: str | Path, step: int, *, model: torch.nn.Module | dict[str, torch.nn.Module],
                    optimizer: torch.optim.Optimizer, state: dict[str, Any], keep_last: int = 2) -> Path:
    """Write `root/step_{step}` atomically and durably; then drop all but the newest `keep_last`.
    `model`: one module, or a dict of named ones (a file each); `state`: JSON-able, tensors
    anywhere inside it going to state.safetensors."""
    modules = named_modules(model)
    state, state_tensors = split_tensors(state)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    clean_leftovers(root)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}-{os.getpid()}"
    try:
        tmp.mkdir()
        for name, module in modules.items():
            save_tensors(module.state_dict(), tmp / f"{name}.safetensors")
        opt_tensors, opt_meta = optimizer_to_files(optimizer)
        save_tensors(opt_tensors, tmp / "optimizer.safetensors")
        rng_tensors, rng_meta = rng_state()
        save_tensors(rng_tensors, tmp / "rng.safetensors")
        if state_tensors:
            save_tensors(state_tensors, tmp / "state.safetensors")
        _publish(root, tmp, final, step, {"step": step, **state, "modules": list(modules),
                                          "state_tensors": len(state_tensors), "optimizer": opt_meta,
                                          "rng": rng_meta})
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        trash = root / f".old-step_{step:08d}-{os.getpid()}"
        if trash.exists() and not final.exists():  # the swap was cut halfway: put the old one back
            os.rename(trash, final)
        previous = latest_checkpoint(root)
        kept = f"; the previous checkpoint {previous.name} stays valid" if previous else ""
        raise TemperError(f"could not write the checkpoint of step {step} in {root} ({e.strerror or e}){kept}") from None
    for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        remove_checkpoint(old)
    return final


def _publish(root: Path, tmp: Path, final: Path, step: int, payload: dict) -> None:
    """Write `state.json` into the finished temporary directory, fsync it, and move it into place:
    an old (or damaged) checkpoint of the same step is swapped aside, never deleted first."""
    with open(tmp / "state.json", "w", encoding="utf-8") as f:
        json.dump(payload, f)
        f.flush()
        os.fsync(f.fileno())
    fsync_path(tmp)
    if final.exists():
        trash = root / f".old-step_{step:08d}-{os.getpid()}"
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_path(root)


def remove_checkpoint(path: Path) -> None:
    """Rename out of the `step_*` names first, so that a kill during the delete leaves an `.old-*`
    leftover (removed by the next run or save), never a half-deleted checkpoint."""
    trash = path.with_name(f".old-{path.name}-{os.getpid()}")
    try:
        os.rename(path, trash)
    except OSError:
        trash = path
    shutil.rmtree(trash, ignore_errors=True)


def clean_leftovers(root: str | Path) -> list[str]:
    """Remove what an interrupted save leaves behind (`.tmp-*` being written, `.old-*` being
    replaced); the run holds the output directory's lock, so no other process is writing them."""
    root = Path(root)
    removed = []
    for p in root.iterdir() if root.is_dir() else []:
        if p.is_dir() and (p.name.startswith(".tmp-step_") or p.name.startswith(".old-step_")):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


CHECKPOINT_FILES = ("optimizer.safetensors", "rng.safetensors", "state.json")  # and each module's file


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not a usable checkpoint (a missing, empty, truncated or unparsable file), or None."""
    distributed = is_distributed_checkpoint(path)
    if distributed:
        problem = _distributed_problem(path)
        if problem is not None:
            return problem
    for name in () if distributed else CHECKPOINT_FILES:
        if not (path / name).is_file():
            return f"{name} is missing"
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        return f"state.json is damaged ({e})"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return "state.json has no step"
    files = _state_tensor_files(state) if distributed else \
        [*(f"{m}.safetensors" for m in state.get("modules", ["model"])), *CHECKPOINT_FILES[:2],
         *_state_tensor_files(state)]
    for name in files:
        if not (path / name).is_file():
            return f"{name} is missing"
        try:  # the header must parse and its tensors must cover the file exactly
            with safe_open(str(path / name), framework="pt") as f:
                f.metadata()
        except (SafetensorError, OSError) as e:
            return f"{name} is damaged ({e})"
    return None


def _state_tensor_files(state: dict) -> list[str]:
    """The files holding the tensors of stateful parts: state.safetensors in one process; one per
    rank (state.rank00001.safetensors) in a distributed checkpoint."""
    if state.get("format") == "dcp":
        return [_rank_state_file(r) for r in state.get("state_tensor_ranks", [])]
    return ["state.safetensors"] if state.get("state_tensors") else []


def _rank_state_file(rank: int) -> str:
    return f"state.rank{rank:05d}.safetensors"


_warned: set[tuple[str, str]] = set()  # (checkpoint, problem): say it once per process


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest checkpoint that is complete and readable (a damaged one is skipped, with a warning)."""
    for path in reversed(list_checkpoints(root)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        if (str(path), problem) not in _warned:
            _warned.add((str(path), problem))
            warnings.warn(f"skipping damaged checkpoint {path}: {problem}", stacklevel=2)
    return None


def load_checkpoint(path: str | Path, *, model: torch.nn.Module | dict[str, torch.nn.Module],
                    optimizer: torch.optim.Optimizer | None, device: torch.device | str = "cpu",
                    restore_rng: bool = True) -> dict[str, Any]:
    """Restore model(s), optimiser and RNG from `path`; return its state.json payload with the
    tensors of stateful parts back in place (on `device` unless saved from the CPU)."""
    path = Path(path)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise TemperError(f"{path}: not a usable checkpoint: {problem}")
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    modules = named_modules(model)
    _check_modules(path, state, modules)
    for name, module in modules.items():
        weights = load_tensors(path / f"{name}.safetensors", device)
        missing, unexpected = module.load_state_dict(weights, strict=False)
        if missing or unexpected:
            which = "the model" if len(modules) == 1 else f"module {name!r}"
            raise TemperError(f"{path}: checkpoint does not fit {which} (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]})")
    if state.get("state_tensors"):
        state = join_tensors(state, load_tensors(path / "state.safetensors"), device)
    if optimizer is not None:
        optimizer_from_files(optimizer, load_tensors(path / "optimizer.safetensors", device), state["optimizer"])
    if restore_rng:
        set_rng_state(load_tensors(path / "rng.safetensors"), state["rng"])
    return state


def _check_modules(path: Path, state: dict, modules: dict[str, torch.nn.Module]) -> None:
    saved = state.get("modules", ["model"])
    if sorted(saved) != sorted(modules):
        raise TemperError(f"{path}: the checkpoint holds the trained modules {saved}, this run trains {list(modules)}")


def resolve_resume(resume: str, root: Path) -> Path | None:
    """`resume`: '' (start fresh), 'auto' (newest valid checkpoint, if any) or a checkpoint path."""
    if not resume or resume in ("false", "none", "no"):
        return None
    if resume == "auto":
        return latest_checkpoint(root)
    path = Path(resume)
    if not path.is_dir():
        raise TemperError(f"resume: checkpoint directory not found: {path}")
    return path


# ----------------------------------------------------------------------------- several processes
# A run with a strategy (ddp, fsdp, tp, pp) saves through torch.distributed.checkpoint (DCP):
#   step_00000100/dcp/*.safetensors   each rank's shards of model and optimiser tensors, in
#                                     DCP's Hugging Face storage (safetensors, JSON metadata:
#                                     nothing pickled), re-sharded on load to any world size
#   rng.safetensors, state.json       as above (rank 0's RNG), plus `world_size` and `ranks`:
#                                     every rank's own state (its data position)
#   state.rank00000.safetensors       each rank's tensors of its stateful parts, when they hold any
# Several named modules are saved as one `torch.nn.ModuleDict`: their tensors are named
# `model.policy.<fqn>`, `optim.value.<fqn>.<state>`; one module keeps `model.<fqn>`.
# The same atomic protocol: written under .tmp-, fsynced, renamed by rank 0.


def _as_one_module(model: torch.nn.Module | dict[str, torch.nn.Module]) -> torch.nn.Module:
    """Several named modules as one ModuleDict (their names become the first part of each key)."""
    modules = named_modules(model)
    return model if isinstance(model, torch.nn.Module) else torch.nn.ModuleDict(modules)


def _dcp_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict, dict]:
    """(flat name -> tensor for DCP, the model state dict, the optimiser state dict), the names
    being the model's own (`model.<fqn>`, `optim.<fqn>.<state>`) whatever the wrapping."""
    from torch.distributed.checkpoint.state_dict import (  # lazy: ~2 s to import, distributed runs only
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    msd = get_model_state_dict(model)
    flat, seen = {}, {}
    renames = getattr(model, "checkpoint_names", {})  # a pipeline's last stage: its copy of the tied weight
    for k, v in msd.items():  # a tied weight (embedding = output layer) is stored once, as safetensors wants
        local = v.to_local() if hasattr(v, "to_local") else v
        where = (local.device, local.untyped_storage().data_ptr(), local.storage_offset(), tuple(v.shape))
        if local.numel() and where in seen:
            continue
        seen[where] = k
        flat[f"model.{renames.get(k, k)}"] = v
    osd = {}
    if optimizer is not None:
        osd = get_optimizer_state_dict(model, optimizer)  # creates empty moments on a fresh optimiser
        for fqn, entries in osd["state"].items():
            for key, value in entries.items():
                if torch.is_tensor(value):
                    flat[f"optim.{renames.get(fqn, fqn)}.{key}"] = value
    return flat, msd, osd


def save_distributed_checkpoint(root: str | Path, step: int, *, model: torch.nn.Module | dict[str, torch.nn.Module],
                                optimizer: torch.optim.Optimizer, state: dict[str, Any], keep_last: int,
                                par: Any) -> Path:
    """Every rank writes its shards (and the tensors of its stateful parts); rank 0 writes the rest
    and renames the directory into place."""
    import torch.distributed.checkpoint as dcp  # lazy: ~2 s to import, distributed runs only

    modules = list(named_modules(model))
    model = _as_one_module(model)
    root = Path(root)
    final, tmp = root / f"step_{step:08d}", root / f".tmp-step_{step:08d}-dist"

    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        clean_leftovers(root)
        tmp.mkdir()

    par.agree(prepare)
    flat, _, osd = _dcp_tensors(model, optimizer)
    state, own_tensors = split_tensors(state)  # every rank's tensor paths are its own state's
    own = {k: v for k, v in state.items() if k not in ("run", "config")}
    ranks = par.gather_objects(json.loads(json.dumps(own)))
    tensor_ranks = [r for r, n in enumerate(par.gather_objects(len(own_tensors))) if n]
    try:
        if own_tensors:
            save_tensors(own_tensors, tmp / _rank_state_file(par.rank))
        dcp.save(flat, storage_writer=dcp.HuggingFaceStorageWriter(str(tmp / "dcp"), save_distributed=True))
        error = None
    except OSError as e:
        error = e
    par.barrier()

    def finish() -> Path:
        if error is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            raise TemperError(f"could not write the checkpoint of step {step} in {root} ({error})")
        groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in osd["param_groups"]]
        for p in sorted((tmp / "dcp").iterdir()):
            fsync_path(p)
        rng_tensors, rng_meta = rng_state()
        save_tensors(rng_tensors, tmp / "rng.safetensors")
        fsync_path(tmp / "dcp")
        _publish(root, tmp, final, step, {"step": step, **state, "world_size": par.world_size, "ranks": ranks,
                                          "modules": modules, "state_tensor_ranks": tensor_ranks,
                                          "optimizer": {"param_groups": groups}, "rng": rng_meta, "format": "dcp"})
        for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            remove_checkpoint(old)
        return final

    return Path(par.agree(finish))


def is_distributed_checkpoint(path: Path) -> bool:
    return (Path(path) / "dcp").is_dir()


def _distributed_problem(path: Path) -> str | None:
    for name in ("state.json", "rng.safetensors"):
        if not (path / name).is_file():
            return f"{name} is missing"
    shards = sorted((path / "dcp").glob("*.safetensors"))
    if not shards:
        return "dcp/ holds no shards"
    for file in [*shards, path / "rng.safetensors"]:
        try:
            with safe_open(str(file), framework="pt") as f:
                f.metadata()
        except (SafetensorError, OSError) as e:
            return f"{file.relative_to(path)} is damaged ({e})"
    return None


def load_distributed_checkpoint(path: Path, *, model: torch.nn.Module | dict[str, torch.nn.Module],
                                optimizer: torch.optim.Optimizer | None, par: Any) -> dict[str, Any]:
    """Restore a DCP checkpoint into this run's layout (any world size, any strategy, one process
    included); each rank's own state (tensors included) comes back as saved when the world size
    is the same, else rank 0's (data positions are global: the loaders convert them)."""
    import torch.distributed.checkpoint as dcp  # lazy: ~2 s to import, distributed runs only
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    _check_modules(path, state, named_modules(model))
    model = _as_one_module(model)
    flat, msd, osd = _dcp_tensors(model, optimizer)
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(flat, storage_reader=dcp.HuggingFaceStorageReader(str(path / "dcp")))
    except Exception as e:  # DCP wraps every rank's failure in a CheckpointException
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise TemperError(f"{path}: checkpoint does not fit the model ({first[:300]})") from None
    renames = getattr(model, "checkpoint_names", {})
    first: dict[tuple, str] = {}
    for key, value in msd.items():  # a tied weight's alias takes what its first name loaded
        local = value.to_local() if hasattr(value, "to_local") else value
        where = (local.device, local.untyped_storage().data_ptr(), local.storage_offset(), tuple(value.shape))
        first.setdefault(where, key)
        msd[key] = flat[f"model.{renames.get(first[where], first[where])}"]
    if optimizer is not None:
        for fqn, entries in osd["state"].items():
            for key in entries:
                name = f"optim.{renames.get(fqn, fqn)}.{key}"
                if name in flat:
                    entries[key] = flat[name]
        saved_groups = state["optimizer"]["param_groups"]
        if len(saved_groups) != len(osd["param_groups"]):
            raise TemperError(f"{path}: the optimiser has {len(osd['param_groups'])} parameter groups, the "
                              f"checkpoint {len(saved_groups)}")
        for group, saved in zip(osd["param_groups"], saved_groups):
            group.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items() if k != "params"})
    set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd) if optimizer is not None else \
        set_state_dict(model, [], model_state_dict=msd, optim_state_dict={})
    set_rng_state(load_tensors(path / "rng.safetensors"), state["rng"])
    ranks = state.get("ranks") or []
    rank = 0
    if state.get("world_size") == par.world_size and len(ranks) == par.world_size:
        state.update(ranks[par.rank])
        rank = par.rank
    if rank in state.get("state_tensor_ranks", []):
        state = join_tensors(state, load_tensors(path / _rank_state_file(rank)), par.device)
    return state


def load_any_checkpoint(path: str | Path, *, model: torch.nn.Module | dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer | None,
                        device: torch.device | str, par: Any) -> dict[str, Any]:
    """A single-process checkpoint or a distributed one, into this run's layout."""
    path = Path(path)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise TemperError(f"{path}: not a usable checkpoint: {problem}")
    if is_distributed_checkpoint(path):
        return load_distributed_checkpoint(path, model=model, optimizer=optimizer, par=par)
    if par.distributed:
        raise TemperError(f"{path} was written by a one-process run (strategy=none): resume it with strategy=none, "
                          "or start the distributed run afresh (a run started with strategy=ddp or fsdp, even on "
                          "one process, resumes on any number)")
    return load_checkpoint(path, model=model, optimizer=optimizer, device=device)
