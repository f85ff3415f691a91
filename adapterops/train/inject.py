"""Put LoRA layers into any ``nn.Module`` and take them out again.

``add_lora`` wraps the targeted linear layers in ``LoraLinear`` and freezes everything else; the
handle it returns reads the current ``Adapter`` value, and undoes the change exactly (``remove``)
or folds the update into the base weights (``merge``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..adapter import Adapter
from ..errors import AdapterOpsError, UnsupportedOperationError, brief, is_out_of_memory
from .layers import LoraLinear, NF4Linear

__all__ = ["LoraConfig", "LoraHandle", "add_lora", "find_targets", "lora_modules", "lora_adapter", "INITS", "QUANTIZERS"]

Targets = str | re.Pattern | Sequence[str]


@dataclass(frozen=True)
class LoraConfig:
    """What ``add_lora`` was asked for, ``alpha`` resolved (the rank when none was given) and
    ``modules`` the paths of the wrapped layers."""

    targets: Any = "all-linear"
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    init: str = "default"
    quantize: str | None = None
    modules: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["targets"] = self.targets.pattern if isinstance(self.targets, re.Pattern) else (
            self.targets if isinstance(self.targets, str) else list(self.targets)
        )
        d["modules"] = list(self.modules)
        return d


# Initialisers: (layer, generator) -> None. They set lora_A / lora_B and may replace layer.base.
def _init_default(layer: LoraLinear, generator: torch.Generator | None) -> None:
    """A as nn.Linear's own init (Kaiming-uniform, bound 1/sqrt(in)), B = 0 (Hu et al. 2021, sec. 4.1)."""
    A = torch.empty(layer.lora_A.shape, dtype=layer.lora_A.dtype)  # drawn on the CPU: same values on any device
    nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
    with torch.no_grad():
        layer.lora_A.copy_(A)
        layer.lora_B.zero_()


def _init_gaussian(layer: LoraLinear, generator: torch.Generator | None) -> None:
    """A ~ N(0, 1/r^2), B = 0."""
    A = torch.empty(layer.lora_A.shape, dtype=layer.lora_A.dtype)
    nn.init.normal_(A, std=1.0 / layer.rank, generator=generator)
    with torch.no_grad():
        layer.lora_A.copy_(A)
        layer.lora_B.zero_()


def _init_pissa(layer: LoraLinear, generator: torch.Generator | None) -> None:
    """PiSSA (Meng et al. 2024, sec. 3): from the top-r singular triplets of ``W = U S Vh``,

        A0 = sqrt(S_r / scale) Vh_r,   B0 = U_r sqrt(S_r / scale),   W_res = W - scale * B0 @ A0,

    so ``W_res + scale * B0 @ A0 = W`` and the model is unchanged at step 0 (up to rounding of
    W_res to the base dtype). The base becomes a new linear layer holding W_res.
    """
    base = layer.base
    if type(base) is not nn.Linear:
        raise UnsupportedOperationError(f"PiSSA needs a dense nn.Linear base, got {type(base).__name__}")
    with torch.no_grad():
        W = base.weight.detach()
        U, S, Vh = torch.linalg.svd(W.to(torch.float32 if W.dtype != torch.float64 else W.dtype), full_matrices=False)
        root = (S[: layer.rank] / layer.scale).sqrt()  # (r,)
        A0 = root[:, None] * Vh[: layer.rank]  # (r, in)
        B0 = U[:, : layer.rank] * root  # (out, r)
        residual = nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
        residual.weight = nn.Parameter((W.to(A0.dtype) - layer.scale * (B0 @ A0)).to(W.dtype), requires_grad=False)
        residual.bias = base.bias
        layer.base = residual
        layer.lora_A.copy_(A0)
        layer.lora_B.copy_(B0)
        layer.init_A = layer.lora_A.detach().clone()
        layer.init_B = layer.lora_B.detach().clone()


INITS: dict[str, Callable[[LoraLinear, torch.Generator | None], None]] = {
    "default": _init_default,
    "gaussian": _init_gaussian,
    "pissa": _init_pissa,
}


def _quantize_nf4(base: nn.Module) -> nn.Module:
    return base if isinstance(base, NF4Linear) else NF4Linear.from_linear(base)


QUANTIZERS: dict[str, Callable[[nn.Module], nn.Module]] = {"nf4": _quantize_nf4}


def find_targets(model: nn.Module, targets: Targets = "all-linear") -> list[str]:
    """Module paths of the linear layers ``targets`` selects, in model order.

    - ``"all-linear"``: every ``nn.Linear`` / ``NF4Linear`` except the output head (``lm_head``
      or what ``get_output_embeddings()`` returns);
    - a list of names: layers whose path is the name or ends with ``.name``;
    - any other string or a compiled regex: layers whose full path matches it (``re.fullmatch``).
    """
    linear = {n: m for n, m in model.named_modules() if n and isinstance(m, (nn.Linear, NF4Linear))}
    if targets == "all-linear":
        head = _output_head(model)
        names = [n for n, m in linear.items() if m is not head and n.rsplit(".", 1)[-1] != "lm_head"]
        what = "all-linear"
    elif isinstance(targets, (str, re.Pattern)):
        try:
            pattern = re.compile(targets) if isinstance(targets, str) else targets
        except re.error as exc:
            raise AdapterOpsError(f"targets {targets!r} is not a valid regular expression ({exc})") from None
        names = [n for n in linear if pattern.fullmatch(n)]
        what = f"regex {pattern.pattern!r} (matched against full module paths)"
    else:
        suffixes = list(targets)
        if not suffixes or not all(isinstance(s, str) and s for s in suffixes):
            raise AdapterOpsError(f"targets must be 'all-linear', a regex or a list of module names, got {targets!r}")
        all_modules = dict(model.named_modules())
        missing = []
        for s in suffixes:
            if not any(_ends_with(n, s) for n in linear):
                others = sorted({type(m).__name__ for n, m in all_modules.items() if n and _ends_with(n, s)})
                missing.append(f"{s!r} (matches {', '.join(others)}, not linear layers)" if others else repr(s))
        if missing:
            raise AdapterOpsError(f"targets match no linear layer: {', '.join(missing)}; linear layers include {_examples(linear)}")
        names = [n for n in linear if any(_ends_with(n, s) for s in suffixes)]
        what = f"names {suffixes}"
    if not names:
        raise AdapterOpsError(f"targets {what} match no linear layer; linear layers include {_examples(linear)}")
    return names


def _ends_with(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _examples(linear: dict[str, nn.Module]) -> str:
    names = list(linear)
    return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "") if names else "none"


def _output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            return getter()
        except (NotImplementedError, AttributeError):
            return None
    return None


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    """The LoRA layers of ``model`` by module path, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def lora_adapter(model: nn.Module, modules: dict[str, LoraLinear] | None = None, **metadata: Any) -> Adapter:
    """The current update of ``model``'s LoRA layers as an Adapter keyed by module path.

    Metadata: the base model's ``name_or_path`` (Hugging Face models), the target module names,
    and ``task_type`` for causal LMs, so a PEFT-format save loads with ``PeftModel.from_pretrained``.
    """
    modules = lora_modules(model) if modules is None else modules
    if not modules:
        raise AdapterOpsError("the model has no LoRA layers; call add_lora(model, ...) first")
    layers = {name: layer.lora_layer() for name, layer in modules.items()}
    meta: dict[str, Any] = {"target_modules": sorted({n.rsplit(".", 1)[-1] for n in modules})}
    name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or getattr(model, "name_or_path", None)
    if name_or_path:
        meta["base_model"] = str(name_or_path)
    if type(model).__name__.endswith("ForCausalLM"):
        meta["task_type"] = "CAUSAL_LM"
    if any(layer.init_A is not None for layer in modules.values()):
        meta["lora_init"] = "pissa"  # factors are the difference from the PiSSA start
    meta.update(metadata)
    return Adapter(layers, meta)


class LoraHandle:
    """What ``add_lora`` returns: the live LoRA layers of one model.

    ``adapter()`` is the current update as an immutable ``Adapter``; ``remove()`` puts the original
    modules back (unchanged, and their ``requires_grad`` flags); ``merge()`` adds the update into
    the base weights and then removes the wrappers.
    """

    def __init__(self, model: nn.Module, config: LoraConfig, modules: dict[str, LoraLinear],
                 originals: dict[str, nn.Module], requires_grad: dict[str, bool]) -> None:
        self.model = model
        self.config = config
        self.modules = modules
        self._originals = originals
        self._requires_grad = requires_grad
        self._attached = True

    def __repr__(self) -> str:
        state = "attached" if self._attached else "detached"
        return f"LoraHandle({len(self.modules)} layers, rank {self.config.rank}, {self.num_params:,} trainable params, {state})"

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def parameters(self) -> Iterator[nn.Parameter]:
        """The trainable factors: A then B of every layer, in model order."""
        for layer in self.modules.values():
            yield layer.lora_A
            yield layer.lora_B

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, layer in self.modules.items():
            yield f"{name}.lora_A", layer.lora_A
            yield f"{name}.lora_B", layer.lora_B

    def adapter(self) -> Adapter:
        """The current update as an Adapter (a copy: later training does not change it)."""
        return lora_adapter(self.model, self.modules)

    def remove(self) -> nn.Module:
        """Put the original modules back and restore every parameter's ``requires_grad``.

        Without ``quantize`` the model is then bit for bit what it was before ``add_lora``; with
        ``quantize="nf4"`` its targeted layers stay 4-bit (``NF4Linear``).
        """
        self._check_attached("remove")
        for name, original in self._originals.items():
            _set_module(self.model, name, original)
        self._restore_flags()
        return self.model

    def merge(self) -> nn.Module:
        """Fold ``W + delta`` into each base weight (computed in float32, cast back) and remove.

        NF4 bases become dense ``nn.Linear`` layers in the dtype they were quantized from:
        re-quantizing would round most of a small update away.
        """
        self._check_attached("merge")
        with torch.no_grad():
            for name, layer in self.modules.items():
                original = self._originals[name]
                delta = layer.delta()  # (out, in), float32
                if isinstance(original, NF4Linear):
                    dense = original.dequantize(torch.float32)
                    merged = nn.Linear(original.in_features, original.out_features, bias=original.bias is not None,
                                       device=dense.device, dtype=original.dtype)
                    merged.weight.copy_(dense + delta.to(dense.device))
                    if original.bias is not None:
                        merged.bias.copy_(original.bias)
                    merged.requires_grad_(False)
                    original = merged
                else:
                    w = original.weight
                    w.copy_((w.to(delta.dtype) + delta.to(w.device)).to(w.dtype))
                _set_module(self.model, name, original)
        self._restore_flags()
        return self.model

    def _check_attached(self, what: str) -> None:
        if not self._attached:
            raise AdapterOpsError(f"cannot {what}: the LoRA layers were already removed or merged")

    def _restore_flags(self) -> None:
        params = dict(self.model.named_parameters(remove_duplicate=False))
        for name, flag in self._requires_grad.items():
            if name in params:
                params[name].requires_grad_(flag)
        self._attached = False


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def add_lora(
    model: nn.Module,
    targets: Targets = "all-linear",
    rank: int = 16,
    alpha: float | None = None,
    dropout: float = 0.0,
    rslora: bool = False,
    init: str = "default",
    quantize: str | None = None,
    dtype: torch.dtype | None = None,
    seed: int | None = None,
) -> LoraHandle:
    """Wrap the targeted linear layers of ``model`` in LoRA layers and freeze everything else.

    Each target computes ``W x + scale * B A dropout(x)`` with ``scale = alpha / rank`` (or
    ``alpha / sqrt(rank)`` with ``rslora``, Kalajdzievski 2023); ``alpha`` defaults to ``rank``.
    ``init``: ``"default"`` (A Kaiming-uniform, B zero: the model is unchanged at step 0),
    ``"gaussian"`` (A ~ N(0, 1/r^2), B zero) or ``"pissa"`` (principal singular vectors, base
    reduced to match). ``quantize="nf4"`` stores the frozen base weights in NF4 (QLoRA, Dettmers
    et al. 2023); a model whose linear layers are already ``NF4Linear`` works as is. The factors
    are float32 over 16-bit bases (else the base dtype) unless ``dtype`` says otherwise; ``seed``
    makes the initialisation independent of the global RNG.
    """
    if lora_modules(model):
        raise AdapterOpsError("the model already has LoRA layers; remove() or merge() them before adding new ones")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise AdapterOpsError(f"rank must be a positive integer, got {rank!r}")
    alpha = float(rank if alpha is None else alpha)
    if not math.isfinite(alpha) or alpha <= 0 or alpha / rank > torch.finfo(torch.float32).max:
        raise AdapterOpsError(f"alpha must be a positive number whose scale alpha/rank fits float32, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise AdapterOpsError(f"dropout must be in [0, 1), got {dropout!r}")
    if init not in INITS:
        raise AdapterOpsError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    if quantize is not None and quantize not in QUANTIZERS:
        raise AdapterOpsError(f"unknown quantize {quantize!r}; choose one of {', '.join(QUANTIZERS)} (or None)")
    names = find_targets(model, targets)
    found = {n: model.get_submodule(n) for n in names}
    if init == "pissa":
        quantized = [n for n, m in found.items() if isinstance(m, NF4Linear)]
        if quantize is not None or quantized:
            raise UnsupportedOperationError("init='pissa' needs dense base weights; it cannot be combined with NF4 bases")
        small = [f"{n} {list(m.weight.shape)}" for n, m in found.items() if rank > min(m.weight.shape)]
        if small:
            raise AdapterOpsError(f"init='pissa' needs rank <= min(out, in); rank {rank} is too large for {small[0]}")

    requires_grad = {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)}
    model.requires_grad_(False)
    generator = None if seed is None else torch.Generator().manual_seed(seed)  # CPU: same init on any device
    modules: dict[str, LoraLinear] = {}
    originals: dict[str, nn.Module] = {}
    try:
        for name, base in found.items():
            originals[name] = base
            layer = LoraLinear(base, rank=rank, alpha=alpha, rslora=rslora, dropout=dropout, dtype=dtype)
            INITS[init](layer, generator)
            if quantize is not None:
                layer.base = QUANTIZERS[quantize](layer.base)
                originals[name] = layer.base  # the quantized layer is what remove() gives back
            modules[name] = layer
            _set_module(model, name, layer)
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        for name in modules:  # the model as it was given
            _set_module(model, name, found[name])
        for n, p in model.named_parameters(remove_duplicate=False):
            p.requires_grad_(requires_grad[n])
        if not is_out_of_memory(exc):
            raise
        values = sum(rank * (m.in_features + m.out_features) for m in found.values())
        raise AdapterOpsError(f"rank {rank} on {len(found)} layers is {values:,} LoRA values, more than memory holds "
                              f"({brief(exc, 160)})") from None
    for layer in modules.values():
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    config = LoraConfig(targets=targets, rank=rank, alpha=alpha, dropout=dropout, rslora=rslora,
                        init=init, quantize=quantize, modules=tuple(names))
    return LoraHandle(model, config, modules, originals, requires_grad)
