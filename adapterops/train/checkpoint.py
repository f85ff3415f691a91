"""Training checkpoints for exact resume: safetensors and JSON only, never pickle.

A checkpoint is a directory ``<checkpoint_dir>/step-00000100/`` holding

- ``lora.safetensors``: every LoRA layer's ``lora_A`` / ``lora_B`` (and PiSSA's ``init_A`` /
  ``init_B``), keyed ``<module path>.<name>``;
- ``optimizer.safetensors``: the optimizer's per-parameter state tensors, keyed
  ``<parameter index>.<name>`` (AdamW: ``step``, ``exp_avg``, ``exp_avg_sq``);
- ``rng.safetensors``: the torch CPU (and each CUDA device's) generator state as uint8 tensors;
- ``state.json``: step, loss history, the optimizer's scalar settings, and the run's settings,
  which a resume must repeat to continue exactly.

Each directory is written to a temporary sibling and renamed into place, so a crash mid-save leaves
the previous checkpoint intact. Reading one back checks every field before any of it is used, so an
edited or foreign checkpoint is one error naming the field, not a failure in the middle of a step.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .._files import atomic_output, read_json, read_safetensors
from .._safetensors import is_json_int, is_json_number
from ..errors import FormatError, brief
from .layers import LoraLinear

__all__ = ["Checkpoint", "save_checkpoint", "find_checkpoint", "load_checkpoint", "restore_lora", "restore_optimizer", "restore_rng"]

STATE = "state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_FACTORS = ("lora_A", "lora_B", "init_A", "init_B")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint as read back."""

    path: Path
    state: dict[str, Any]  # state.json
    lora: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    modules: dict[str, LoraLinear],
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
) -> Path:
    """Write ``directory/step-<step>`` and return its path."""
    path = Path(directory) / f"step-{step:08d}"
    lora = {
        f"{name}.{part}": getattr(layer, part).detach().contiguous().cpu()
        for name, layer in modules.items()
        for part in _FACTORS
        if getattr(layer, part) is not None
    }
    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in opt["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{key}"] = value
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda.{i}"] = s
    meta = {**state, "step": step, "optimizer": {"param_groups": opt["param_groups"], "scalars": scalars}}
    with atomic_output(path, force=True) as tmp:
        tmp.mkdir()
        save_file(lora, str(tmp / "lora.safetensors"))
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / STATE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def find_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` itself if it is a checkpoint, else its latest ``step-*`` subdirectory."""
    path = Path(path)
    if (path / STATE).is_file():
        return path
    if not path.is_dir():
        raise FormatError(f"{path}: no such checkpoint directory")
    steps = sorted((int(m[1]), p) for p in path.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / STATE).is_file())
    if not steps:
        raise FormatError(f"{path}: no checkpoint in it (expected step-* directories with {STATE})")
    return steps[-1][1]


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint directory (or the latest one under ``path``)."""
    path = find_checkpoint(path)
    state = read_json(path / STATE)
    if not isinstance(state, dict) or "step" not in state:
        raise FormatError(f"{path / STATE}: not a training checkpoint state")
    lora, _ = read_safetensors(path / "lora.safetensors")
    optimizer, _ = read_safetensors(path / "optimizer.safetensors")
    rng, _ = read_safetensors(path / "rng.safetensors")
    problem = _state_problem(state) or _tensor_problem(lora, optimizer, rng)
    if problem:
        raise FormatError(f"{path}: {problem}; not a checkpoint as train_lora writes it (edited, or from another program?)")
    return Checkpoint(path=path, state=state, lora=lora, optimizer=optimizer, rng=rng)


_STATE_KEY = re.compile(r"^\d+\.[A-Za-z_]\w*$")  # <parameter index>.<name>
_RNG_KEY = re.compile(r"^(cpu|cuda\.\d+)$")


def _state_problem(state: dict[str, Any]) -> str | None:
    """What in ``state.json`` a run cannot have written, or None."""
    settings = state.get("settings", {})
    step = state["step"]
    if not isinstance(settings, dict):
        return "settings is not an object"
    total = settings.get("total_steps")
    if not is_json_int(total):
        return "settings.total_steps is not a whole number"
    if not is_json_int(step) or not 0 <= step <= total:
        return f"step {step!r} is not a whole number of steps between 0 and the run's {total}"
    losses, evals = state.get("losses", []), state.get("eval_losses", [])
    if not isinstance(losses, list) or not all(is_json_number(x) for x in losses):
        return "losses is not a list of numbers"
    if not isinstance(evals, list) or not all(isinstance(e, list) and len(e) == 2 and is_json_int(e[0]) and is_json_number(e[1]) for e in evals):
        return "eval_losses is not a list of [step, loss] pairs"
    opt = state.get("optimizer")
    if not isinstance(opt, dict) or not isinstance(opt.get("param_groups"), list) or not isinstance(opt.get("scalars", {}), dict):
        return "optimizer is not an object with param_groups (a list) and scalars (an object)"
    for group in opt["param_groups"]:
        if not isinstance(group, dict) or not isinstance(group.get("params"), list) or not all(is_json_int(i) and i >= 0 for i in group["params"]):
            return "a parameter group without a list of parameter indices"
        if not all(is_json_number(group.get(k, 0.0)) for k in ("lr", "weight_decay", "eps")):
            return "a parameter group whose lr, weight_decay or eps is not a number"
        betas = group.get("betas", [0.0, 0.0])
        if not isinstance(betas, list) or len(betas) != 2 or not all(is_json_number(b) for b in betas):
            return "a parameter group whose betas are not two numbers"
    if not all(_STATE_KEY.match(k) for k in opt.get("scalars", {})):
        return "optimizer scalars keyed other than <parameter index>.<name>"
    return None


def _tensor_problem(lora: dict[str, torch.Tensor], optimizer: dict[str, torch.Tensor], rng: dict[str, torch.Tensor]) -> str | None:
    for file, tensors in (("lora", lora), ("optimizer", optimizer)):
        bad = next((k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
        if bad is not None:
            return f"{file}.safetensors: {bad} holds NaN or Inf"
    bad = next((k for k in optimizer if not _STATE_KEY.match(k)), None)
    if bad is not None:
        return f"optimizer.safetensors holds {bad!r}, not keyed <parameter index>.<name>"
    if "cpu" not in rng or any(not _RNG_KEY.match(k) or v.dtype != torch.uint8 or v.dim() != 1 for k, v in rng.items()):
        return "rng.safetensors does not hold generator states (cpu, cuda.N: 1-D uint8)"
    return None


def restore_lora(checkpoint: Checkpoint, modules: dict[str, LoraLinear]) -> None:
    """Copy the saved factors into ``modules``; FormatError if the layers do not match."""
    saved = checkpoint.lora
    expected = {f"{n}.{p}": getattr(m, p) for n, m in modules.items() for p in _FACTORS if getattr(m, p) is not None}
    missing = sorted(expected.keys() - saved.keys())
    extra = sorted(k for k in saved.keys() - expected.keys() if not k.endswith(("init_A", "init_B")))
    if missing or extra:
        example = (missing or extra)[0]
        raise FormatError(
            f"{checkpoint.path}: its LoRA layers differ from the model's ({len(missing)} missing, {len(extra)} "
            f"unexpected, e.g. {example}); call add_lora with the same targets, rank and init as the run that saved it"
        )
    with torch.no_grad():
        for key, param in expected.items():
            value = saved[key]
            if not value.is_floating_point() or value.shape != param.shape:
                raise FormatError(f"{checkpoint.path}: {key} is {list(value.shape)} {value.dtype}, the model's is {list(param.shape)} {param.dtype}")
            param.copy_(value)
        for name, layer in modules.items():  # PiSSA starting factors saved by the run
            for part in ("init_A", "init_B"):
                key = f"{name}.{part}"
                if key in saved and getattr(layer, part) is None:
                    setattr(layer, part, saved[key].to(layer.lora_A.device))


def restore_optimizer(checkpoint: Checkpoint, optimizer: torch.optim.Optimizer) -> None:
    saved = checkpoint.state["optimizer"]
    state: dict[int, dict[str, Any]] = {}
    for key, value in checkpoint.optimizer.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for key, value in saved.get("scalars", {}).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = saved["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, TypeError) as exc:
        raise FormatError(f"{checkpoint.path}: optimizer state does not fit this run ({exc})") from None
    problem = _optimizer_problem(optimizer)
    if problem:
        raise FormatError(f"{checkpoint.path}: optimizer state does not fit this run ({problem})")


def _optimizer_problem(optimizer: torch.optim.Optimizer) -> str | None:
    """Loaded state that differs in its entries from parameter to parameter, or is not shaped like its
    parameter. (A parameter without state is one that had no gradient yet, as in torch.)"""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if len({tuple(sorted(optimizer.state[p])) for p in params if p in optimizer.state}) > 1:
        return "its parameters hold different entries"
    for index, p in enumerate(params):
        for name, value in optimizer.state.get(p, {}).items():
            if not isinstance(value, torch.Tensor):
                continue
            scalar = value.numel() == 1 and value.dim() == 0
            if not value.is_floating_point() or not (scalar or value.shape == p.shape):
                return f"{index}.{name} is {list(value.shape)} {value.dtype} for a parameter of {list(p.shape)}"
    return None


def restore_rng(checkpoint: Checkpoint) -> None:
    rng = checkpoint.rng
    cuda = [rng[k] for k in sorted((k for k in rng if k.startswith("cuda.")), key=lambda k: int(k.split(".")[1]))]
    try:
        torch.set_rng_state(rng["cpu"])
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    except RuntimeError as exc:  # a state of the wrong size for this torch's generators
        raise FormatError(f"{checkpoint.path}: rng.safetensors does not fit this torch's generators ({brief(exc, 200)})") from None
