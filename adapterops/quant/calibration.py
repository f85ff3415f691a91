"""Where GPTQ's Hessians come from: calibration text run through the model, or the adapter itself.

``collect_hessians`` runs calibration text (the JSONL shapes ``train`` reads, see
``adapterops.train.data``) through the model and sums, for each wanted linear weight,

    H = sum_t x_t x_t^T        (in, in), x_t the layer's input at token t

streaming, one decoder layer at a time (GPTQ's own scheme, Frantar et al. 2023, sec. 5): the
model is built from its config with every parameter on the meta device; the embeddings are
loaded, the calibration sequences run up to the first decoder layer, whose inputs (hidden states
and the keyword arguments the model hands its layers: position embeddings, masks) are kept; then
each decoder layer in turn is loaded from the checkpoint (NF4 weights dequantized through their
codec, merged weights with their delta added), run on every sequence with hooks summing ``H``,
and dropped, its outputs being the next layer's inputs. Only one decoder layer and the hidden
states of the sequences are ever in memory. The inputs are those of the model the merge is meant
to reproduce (base plus adapter, in float32), not of the already rounded layers.

``adapter_hessian`` is the data-free choice: without text, the inputs that matter most to an
adapter's effect ``D = L @ R`` are its own input directions, the row space of ``D``. With ``V``
(in, k) its right singular vectors,

    H = V V^T + ridge * (k / in) * I

so error feedback moves rounding error out of the directions the adapter reads (where it would
cancel the adapter) into the rest of the input space, and the ridge (as much total weight as the
adapter's directions when ``ridge = 1``) keeps it from piling up there: inputs of a real model
have energy everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import Checkpoint
from ..errors import AdapterOpsError, FormatError, UnsupportedOperationError, brief
from ..linalg import factored_svd
from ..rewrite import resolve_device
from ..storage import logical_weights

__all__ = ["RIDGE", "Hessians", "adapter_hessian", "collect_hessians", "calibration_examples"]

RIDGE = 1.0  # weight of the isotropic part of the data-free Hessian, relative to the adapter's directions


def adapter_hessian(L: torch.Tensor, R: torch.Tensor, *, ridge: float = RIDGE) -> torch.Tensor:
    """The data-free Hessian ``V V^T + ridge * (k / in) * I`` of a delta ``L @ R``, batched.

    ``L`` (..., out, r), ``R`` (..., r, in); ``V`` spans the row space of ``L @ R`` (k = min(r, out, in)).
    """
    _, _, Vh = factored_svd(L.float() if L.dtype != torch.float64 else L, R.float() if R.dtype != torch.float64 else R)  # (..., k, in)
    k, n = Vh.shape[-2], Vh.shape[-1]
    H = Vh.mT @ Vh  # (..., in, k) @ (..., k, in) -> (..., in, in)
    H.diagonal(dim1=-2, dim2=-1).add_(ridge * k / n)
    return H


def calibration_examples(data: str | os.PathLike | Sequence[Sequence[int]], tokenizer: Any, *, samples: int, max_len: int) -> list[list[int]]:
    """Token ids of the first ``samples`` calibration sequences, each cut to ``max_len`` tokens.

    ``data``: a JSONL file in one of ``train``'s shapes (all tokens of a row are used, prompt
    included), or sequences of token ids.
    """
    if samples < 1:
        raise AdapterOpsError(f"calibration_samples must be at least 1, got {samples}")
    if max_len < 2:
        raise AdapterOpsError(f"max_len must be at least 2, got {max_len}")
    if isinstance(data, (str, os.PathLike)):
        from ..train.data import load_jsonl

        rows = [e["input_ids"] for e in load_jsonl(data, tokenizer, max_len=max_len)]
    else:
        rows = [list(map(int, r))[:max_len] for r in data]
    rows = [r for r in rows if r][:samples]
    if not rows:
        raise AdapterOpsError("no calibration sequence (the data is empty)")
    return rows


class Hessians(dict):
    """``{weight: H}``, with what they were summed over: ``sequences`` and ``tokens``."""

    def __init__(self, hessians: Mapping[str, torch.Tensor] = (), *, sequences: int = 0, tokens: int = 0) -> None:
        super().__init__(hessians)
        self.sequences, self.tokens = sequences, tokens

    def summary(self) -> dict[str, int]:
        return {"sequences": self.sequences, "tokens": self.tokens}


@contextmanager
def _parameters_on_meta():
    """Build modules with every parameter on the meta device (no memory, no initialisation) and
    every buffer real, so the rotary tables and the like are computed as usual."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


class _Caught(Exception):
    def __init__(self, args: tuple, kwargs: dict) -> None:
        super().__init__()
        self.args_, self.kwargs = args, kwargs


class _Catcher(nn.Module):
    """Stands in for the first decoder layer: records what it is called with, then stops the model."""

    def forward(self, *args: Any, **kwargs: Any) -> None:
        raise _Caught(args, kwargs)


def _decoder_layers(model: nn.Module, num_layers: int | None) -> tuple[str, nn.ModuleList]:
    """The model's stack of decoder layers: the first ``ModuleList`` as long as the config's layer count."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (num_layers is None or len(module) == num_layers):
            return name, module
    raise UnsupportedOperationError("calibration needs a decoder-only transformer with a list of decoder layers; this model has none")


def _load_parameters(module: nn.Module, prefix: str, checkpoint: Checkpoint, stored: Mapping, device: torch.device,
                     deltas: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Replace the meta parameters of ``module`` by the checkpoint's, decoded to float32 on ``device``."""
    for name, param in list(module.named_parameters()):
        full = prefix + name
        if full not in stored:
            raise FormatError(f"{checkpoint.source}: the model's parameter {full} is not in the checkpoint; calibration needs the full model")
        codec, members = stored[full]
        tensors = {m: checkpoint.read(m).to(device) for m in members}
        value = codec.decode(tensors, full).to(torch.float32)
        if value.shape != param.shape:
            raise FormatError(
                f"{checkpoint.source}: {full} is {list(value.shape)} in the checkpoint, but the model its config.json "
                f"describes has it {list(param.shape)}; the config does not belong to these weights"
            )
        if full in deltas:
            L, R = deltas[full]
            value += L.to(device, torch.float32) @ R.to(device, torch.float32)  # (out, r) @ (r, in)
        owner, _, leaf = name.rpartition(".")
        sub = module.get_submodule(owner) if owner else module
        sub._parameters[leaf] = nn.Parameter(value, requires_grad=False)


class _Gram:
    """Forward pre-hooks summing ``x^T x`` per linear; linears fed the same tensor share one sum.

    Which linears share an input is learnt in the first forward (by tensor identity, the inputs
    held until it ends so that no address is reused); later forwards sum once per group.
    """

    def __init__(self, linears: Mapping[str, nn.Linear]) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.owner: dict[str, str] = {}  # weight -> the weight whose sum it shares
        self._first: list[tuple[torch.Tensor, str]] | None = []
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in linears.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if name not in self.owner:
                same = [owner for t, owner in self._first if t is x]
                self.owner[name] = same[0] if same else name
                self._first.append((x, name))
            if self.owner[name] != name:
                return
            x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)  # (tokens, in)
            if name not in self.sums:
                self.sums[name] = torch.zeros(x2.shape[1], x2.shape[1], dtype=torch.float32, device=x2.device)
            self.sums[name].addmm_(x2.mT, x2)  # (in, tokens) @ (tokens, in)

        return hook

    def forward_done(self) -> None:
        self._first = []

    def result(self) -> dict[str, torch.Tensor]:
        """``{weight: H}`` on the CPU; weights sharing an input share the tensor."""
        host = {owner: h.cpu() for owner, h in self.sums.items()}
        return {name: host[owner] for name, owner in self.owner.items()}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """The call of the next decoder layer: the same arguments with new hidden states."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _buffers_to(model: nn.Module, device: torch.device) -> None:
    for module in model.modules():
        for key, buf in module._buffers.items():
            if buf is not None and buf.device.type != "meta":
                module._buffers[key] = buf.to(device)


def collect_hessians(
    checkpoint: Checkpoint | str | Path,
    data: str | os.PathLike | Sequence[Sequence[int]],
    weights: Iterable[str],
    *,
    deltas: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    samples: int = 128,
    max_len: int = 2048,
    device: str | torch.device | None = None,
    tokenizer: Any = None,
    progress: bool = False,
) -> Hessians:
    """``{weight: H}`` (float32 (in, in), on the CPU) for the linear ``weights`` of ``checkpoint``.

    ``data``: calibration text (see ``calibration_examples``). ``deltas``: ``{weight: (L, R)}``
    added to those weights while running (``W + L @ R``), so the inputs are the merged model's.
    ``tokenizer``: default the checkpoint's own. See the module docstring for how it runs.
    """
    try:
        import transformers
    except ImportError:
        raise UnsupportedOperationError("calibration runs the model with transformers; pip install 'adapterops[train]'") from None
    checkpoint = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
    dev = resolve_device(device)
    wanted = list(dict.fromkeys(weights))
    if not wanted:
        return Hessians()
    deltas = dict(deltas or {})
    config_dict = checkpoint.config()
    if config_dict is None:
        raise FormatError(f"{checkpoint.source}: no config.json, which calibration needs to build the model")
    try:
        config = transformers.AutoConfig.from_pretrained(checkpoint.root)
    except Exception as exc:  # transformers' config validation raises its own exception types too
        raise FormatError(f"{checkpoint.source}: cannot read the model config for calibration ({brief(exc, 300)})") from None
    if tokenizer is None and isinstance(data, (str, os.PathLike)):
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint.root)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise FormatError(
                f"{checkpoint.source}: no usable tokenizer for the calibration text ({brief(exc, 200)}); "
                "put the model's tokenizer files next to its config.json"
            ) from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.use_cache = False
    examples = calibration_examples(data, tokenizer, samples=samples, max_len=max_len)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its advice on model classes is not this command's output
    try:
        with _parameters_on_meta():
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except Exception as exc:  # whatever the model class raises for a config it cannot take
        raise UnsupportedOperationError(
            f"{checkpoint.source}: calibration cannot build a causal LM from its config.json ({brief(exc, 300)})"
        ) from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    model.eval()
    stored = logical_weights(checkpoint)
    prefix, layers = _decoder_layers(model, getattr(config, "num_hidden_layers", None))
    linears = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = [w for w in wanted if w not in linears or not w.startswith(prefix + ".")]
    if missing:
        raise UnsupportedOperationError(f"calibration: {missing[0]} is not a linear layer inside the decoder layers ({prefix}) of this model")
    embeddings = model.get_input_embeddings()
    emb_name = next(n for n, m in model.named_modules() if m is embeddings)
    _load_parameters(embeddings, f"{emb_name}.", checkpoint, stored, dev, {})
    _buffers_to(model, dev)  # rotary tables and the like; the parameters stay on meta until loaded

    first = layers[0]
    layers[0] = _Catcher()
    inputs: list[tuple[tuple, dict]] = []
    with torch.no_grad():
        for ids in examples:
            try:
                model(input_ids=torch.tensor([ids], device=dev), use_cache=False)
            except _Caught as caught:
                inputs.append((caught.args_, caught.kwargs))
            else:
                raise UnsupportedOperationError("calibration: the model never called its first decoder layer")
    layers[0] = first
    embeddings.to("meta")
    last = max(int(w[len(prefix) + 1 :].split(".")[0]) for w in wanted)
    found: dict[str, torch.Tensor] = {}
    from .._progress import Progress

    with Progress("calibrating", total_items=last + 1, total_bytes=0, enabled=progress) as prog, torch.no_grad():
        for i in range(last + 1):
            layer, here = layers[i], f"{prefix}.{i}."
            _load_parameters(layer, here, checkpoint, stored, dev, deltas)
            gram = _Gram({w: linears[w] for w in wanted if w.startswith(here)})
            try:
                for s, (args, kwargs) in enumerate(inputs):
                    out = layer(*args, **kwargs)
                    gram.forward_done()
                    inputs[s] = _with_hidden(args, kwargs, out[0] if isinstance(out, (tuple, list)) else out)
            finally:
                gram.remove()
            found.update(gram.result())
            layer.to("meta")
            prog.advance(1)
    return Hessians({w: found[w] for w in wanted}, sequences=len(examples), tokens=sum(map(len, examples)))
