"""GGUF LoRA adapters, the format llama.cpp and Ollama apply at run time (``--lora x.gguf``,
Ollama's ``ADAPTER x.gguf``).

What llama.cpp reads (``src/llama-adapter.cpp``): ``general.type = "adapter"``,
``general.architecture`` equal to the model's, ``adapter.type = "lora"``, one float32
``adapter.lora.alpha`` per file, and tensor pairs ``<base tensor>.lora_a`` / ``.lora_b`` named
after the base's tensors (``blk.N.attn_q.weight.lora_a``). ``lora_a`` has ggml shape
``ne = [in, r]`` and ``lora_b`` ``ne = [r, out]``, so in torch order they are PEFT's ``A`` (r, in)
and ``B`` (out, r). Each pair is applied as

    y += s * B @ (A @ x),   s = alpha / r   (r = that pair's rank),   or s = 1 when alpha = 0

so one alpha serves every rank in the file. To keep every layer's own scale exact, ``write``
picks the file alpha that most layers already satisfy (their own alpha, or 0 when their scale is
1, as after any adapterops algebra) and folds the scale of every other layer into ``B`` (in float64,
stored as float32): ``B' = B * scale / s_file``.

Llama-family bases (``general.architecture = "llama"``: Llama 2/3, SmolLM2, Mistral) are stored
with the rows of ``q_proj`` and ``k_proj`` reordered per head for llama.cpp's rotary embedding
(``LlamaModel.permute`` in ``convert_hf_to_gguf.py``): head ``h``'s rows ``[x_0..x_{d/2-1},
y_0..y_{d/2-1}]`` become ``[x_0, y_0, x_1, y_1, ...]``. The same reordering applies to ``B`` of
those layers (the delta's rows are the weight's rows); ``read`` undoes it.

The HF module path <-> GGUF tensor name map is data (``gguf_names.json``), one entry per supported
architecture. The base (``base=``) gives the architecture, the head counts and, where it has
weights, the shapes to check against: a HF checkpoint directory, a Hub repo id (only its
``config.json`` is fetched, cache first), or the base model's own GGUF file.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._files import read_json
from ..adapter import Adapter, LoraLayer
from ..errors import BaseMismatchError, FormatError, UnsupportedOperationError
from ._gguf_file import is_gguf, read_gguf, read_tensor, write_gguf

__all__ = ["ARCHITECTURES", "Architecture", "GGUFBase", "describe_base", "rope_permute", "rope_unpermute", "sniff", "read", "write"]

SUFFIXES = (".gguf",)
USES_BASE = True  # formats/__init__.py passes ``base=`` to read and write

ALPHA_KEY = "adapter.lora.alpha"
MODULES_KEY = "adapterops.modules"  # "blk.0.attn_q=model.layers.0.self_attn.q_proj", one per pair
HEADS_KEY, KV_HEADS_KEY = "adapterops.head_count", "adapterops.head_count_kv"
BASE_MODEL_KEY = "adapterops.base_model"
_LORA_A, _LORA_B = ".weight.lora_a", ".weight.lora_b"


@dataclass(frozen=True)
class Architecture:
    """One llama.cpp architecture: which HF models it covers and how their tensors are named."""

    name: str
    description: str
    hf_architectures: tuple[str, ...]
    hf_model_types: tuple[str, ...]
    rope_permute: Mapping[str, str]  # GGUF tensor kind (attn_q) -> head count key (head_count)
    tensors: Mapping[str, str]  # HF pattern (model.layers.{bid}.self_attn.q_proj) -> GGUF (blk.{bid}.attn_q)

    def to_gguf(self, module: str) -> str | None:
        """``model.layers.3.self_attn.q_proj`` (also without ``model.`` or with PEFT's prefix) -> ``blk.3.attn_q``."""
        name = module.removeprefix("base_model.model.")
        for hf, gguf in self.tensors.items():
            m = re.fullmatch(_pattern(hf, optional_prefix="model."), name)
            if m:
                return gguf.format(**m.groupdict())
        return None

    def to_hf(self, tensor: str) -> str | None:
        """``blk.3.attn_q`` -> ``model.layers.3.self_attn.q_proj``."""
        for hf, gguf in self.tensors.items():
            m = re.fullmatch(_pattern(gguf), tensor)
            if m:
                return hf.format(**m.groupdict())
        return None

    def head_key(self, tensor: str) -> str | None:
        """The head count key whose per-head row reordering ``tensor`` (``blk.3.attn_q``) carries, if any."""
        return self.rope_permute.get(tensor.rsplit(".", 1)[-1])


def _pattern(template: str, *, optional_prefix: str = "") -> str:
    """A regex for ``template`` with ``{bid}`` as a block number; ``optional_prefix`` may be absent."""
    prefix = optional_prefix if optional_prefix and template.startswith(optional_prefix) else ""
    body = re.escape(template[len(prefix):]).replace(re.escape("{bid}"), r"(?P<bid>\d+)")
    return rf"(?:{re.escape(prefix)})?{body}" if prefix else body


def _load_architectures() -> dict[str, Architecture]:
    table = json.loads(Path(__file__).with_name("gguf_names.json").read_text(encoding="utf-8"))["architectures"]
    return {
        name: Architecture(name, e["description"], tuple(e["hf_architectures"]), tuple(e["hf_model_types"]), e["rope_permute"], e["tensors"])
        for name, e in table.items()
    }


ARCHITECTURES: dict[str, Architecture] = _load_architectures()


def _supported() -> str:
    return "; ".join(f"{a.name} ({a.description})" for a in ARCHITECTURES.values())


@dataclass(frozen=True)
class GGUFBase:
    """What a GGUF export needs from the base model."""

    source: str
    architecture: Architecture
    heads: Mapping[str, int]  # head_count, head_count_kv
    block_count: int | None
    shapes: Mapping[str, tuple[int, int]] | None  # GGUF tensor (blk.0.attn_q) -> (out, in), where known
    tied_embeddings: bool = False


def describe_base(base: str | os.PathLike | GGUFBase) -> GGUFBase:
    """Architecture, head counts and tensor shapes of ``base``: a GGUF file, HF checkpoint directory or Hub id."""
    if isinstance(base, GGUFBase):
        return base
    path = Path(base)
    if path.is_file() and is_gguf(path):
        return _gguf_base(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FormatError(f"{path}: no config.json; a GGUF base is a HF checkpoint directory, a Hub repo id, or the base model's .gguf file")
        return _hf_base(str(base), read_json(path / "config.json"), path)
    if path.exists():
        raise FormatError(f"{path}: not a GGUF file or a HF checkpoint directory")
    return _hf_base(str(base), _hub_config(str(base)), None)


def _gguf_base(path: Path) -> GGUFBase:
    file = read_gguf(path)
    meta = file.metadata
    if meta.get("general.type", "model") != "model":
        raise FormatError(f"{path}: general.type is {meta.get('general.type')!r}; the base must be a model GGUF, not an adapter")
    arch = _architecture(str(meta.get("general.architecture")), f"{path}: the base's")
    heads = {}
    for key in ("head_count", "head_count_kv"):
        value = meta.get(f"{arch.name}.attention.{key}")
        if isinstance(value, list):  # per-layer counts; fine only when they agree
            value = value[0] if len(set(value)) == 1 else None
        if value is not None:
            heads[key] = int(value)
    shapes = {n.removesuffix(".weight"): t.shape for n, t in file.tensors.items() if n.endswith(".weight") and len(t.shape) == 2}
    blocks = meta.get(f"{arch.name}.block_count")
    return GGUFBase(str(path), arch, heads, None if blocks is None else int(blocks), shapes, "output" not in shapes)


def _hf_base(source: str, config: Any, directory: Path | None) -> GGUFBase:
    if not isinstance(config, dict):
        raise FormatError(f"{source}: config.json is not a JSON object")
    names = list(config.get("architectures") or [])
    model_type = config.get("model_type")
    arch = next((a for a in ARCHITECTURES.values() if set(names) & set(a.hf_architectures) or model_type in a.hf_model_types), None)
    if arch is None:
        what = names[0] if names else model_type
        raise FormatError(f"{source}: a {what} model; GGUF export supports {_supported()}")
    n_head = config.get("num_attention_heads")
    heads = {} if n_head is None else {"head_count": int(n_head), "head_count_kv": int(config.get("num_key_value_heads") or n_head)}
    shapes = None
    if directory is not None and any(directory.glob("*.safetensors")):
        from ..checkpoint import Checkpoint

        ckpt = Checkpoint(directory)
        shapes = {}
        for name in ckpt.names():
            gguf = arch.to_gguf(name.removesuffix(".weight")) if name.endswith(".weight") else None
            if gguf is not None and len(ckpt.shape(name)) == 2:
                shapes[gguf] = tuple(ckpt.shape(name))
    blocks = config.get("num_hidden_layers")
    return GGUFBase(source, arch, heads, None if blocks is None else int(blocks), shapes, bool(config.get("tie_word_embeddings", False)))


def _hub_config(repo: str) -> Any:
    """``config.json`` of a Hub repo: the local cache first, the Hub unless offline."""
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", repo):
        raise FormatError(f"{repo}: no such file or directory, and not a Hub repo id")
    from huggingface_hub import hf_hub_download

    try:
        return read_json(hf_hub_download(repo, "config.json", local_files_only=True))
    except FormatError:
        raise
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise FormatError(f"{repo}: not a local path, and its config.json is not in the Hugging Face cache (offline mode is on); download it first or pass a directory")
    try:
        return read_json(hf_hub_download(repo, "config.json"))
    except FormatError:
        raise
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FormatError(f"{repo}: not a local path, and the Hub could not provide its config.json ({reason}); check the name, or pass a directory") from None


def _architecture(name: str, where: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise FormatError(f"{where} architecture is {name!r}; adapterops handles GGUF adapters for {_supported()}")
    return ARCHITECTURES[name]


def rope_permute(B: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF row order -> llama.cpp's: per head, rows ``[x_0..x_{d/2-1}, y_0..]`` -> ``[x_0, y_0, x_1, y_1, ...]``."""
    out = B.shape[0]
    # (out, r) -> (heads, 2, d/2, r) -> (heads, d/2, 2, r) -> (out, r)
    return B.reshape(n_head, 2, out // n_head // 2, *B.shape[1:]).transpose(1, 2).reshape(B.shape)


def rope_unpermute(B: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of ``rope_permute``."""
    out = B.shape[0]
    # (out, r) -> (heads, d/2, 2, r) -> (heads, 2, d/2, r) -> (out, r)
    return B.reshape(n_head, out // n_head // 2, 2, *B.shape[1:]).transpose(1, 2).reshape(B.shape)


def _heads_for(arch: Architecture, tensor: str, heads: Mapping[str, int], rows: int, where: str) -> int | None:
    key = arch.head_key(tensor)
    if key is None:
        return None
    n = heads[key]
    if n <= 0 or rows % (2 * n):
        raise BaseMismatchError(f"{where}: {tensor} has {rows} rows, which {n} heads of even size cannot hold; was this adapter made for another base?")
    return n


def sniff(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in SUFFIXES and is_gguf(path)


def read(path: Path, *, base: str | os.PathLike | GGUFBase | None = None) -> Adapter:
    """A GGUF LoRA file as an Adapter keyed by HF module paths, with the deltas llama.cpp applies."""
    file = read_gguf(path)
    meta = file.metadata
    kind = meta.get("general.type")
    if kind in (None, "model"):  # llama.cpp reads a GGUF without general.type as a model
        raise FormatError(f"{path}: a model GGUF, not an adapter (general.type is not 'adapter'); pass it as the base (base=, --base) instead")
    if kind != "adapter":
        raise FormatError(f"{path}: general.type is {kind!r}, not 'adapter': this GGUF is not an adapter")
    if meta.get("adapter.type") != "lora":
        raise FormatError(f"{path}: adapter.type is {meta.get('adapter.type')!r}; only LoRA adapters are supported")
    arch = _architecture(str(meta.get("general.architecture")), f"{path}: the adapter's")
    info = None if base is None else describe_base(base)
    if info is not None and info.architecture.name != arch.name:
        raise BaseMismatchError(f"{path}: the adapter is for {arch.name}, the base {info.source} is {info.architecture.name}")
    alpha = float(meta.get(ALPHA_KEY, 0.0) or 0.0)
    names = dict(entry.split("=", 1) for entry in meta.get(MODULES_KEY, []) if "=" in entry)
    heads = {k: int(meta[key]) for k, key in (("head_count", HEADS_KEY), ("head_count_kv", KV_HEADS_KEY)) if key in meta}
    heads = heads or (dict(info.heads) if info is not None else {})

    pairs: dict[str, dict[str, str]] = {}
    ignored = []
    for name in file.tensors:
        if name.endswith((".lora_a", ".lora_b")):
            pairs.setdefault(name[: -len(".lora_a")], {})[name[-1]] = name
        elif name.endswith("_norm.weight"):  # llama.cpp skips these too (mergekit adds them)
            ignored.append(name)
        else:
            raise FormatError(f"{path}: tensor {name} is not a LoRA factor (names end in .lora_a or .lora_b)")
    layers, needs_heads = {}, []
    for weight, roles in pairs.items():
        if set(roles) != {"a", "b"}:
            raise FormatError(f"{path}: {weight} has lora_{next(iter(roles))} but no lora_{'b' if 'a' in roles else 'a'}")
        tensor = weight.removesuffix(".weight")
        if tensor == "token_embd":
            raise UnsupportedOperationError(f"{path}: a LoRA on the token embeddings (token_embd); adapterops holds LoRAs of linear layers only")
        module = names.get(tensor) or arch.to_hf(tensor)
        if module is None:
            raise FormatError(f"{path}: tensor {weight} has no HF module in adapterops' {arch.name} name table")
        A, B = read_tensor(file, roles["a"]), read_tensor(file, roles["b"])
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise FormatError(f"{path}: {weight} has lora_a {list(A.shape)} and lora_b {list(B.shape)}; expected [r, in] and [out, r]")
        if info is not None and info.shapes is not None and tensor in info.shapes and info.shapes[tensor] != (B.shape[0], A.shape[1]):
            raise BaseMismatchError(f"{path}: {weight} is [{B.shape[0]}, {A.shape[1]}] but the base's tensor is {list(info.shapes[tensor])}; was it made for another base?")
        if arch.head_key(tensor) is not None:
            if not heads:
                needs_heads.append(weight)
                continue
            B = rope_unpermute(B, _heads_for(arch, tensor, heads, B.shape[0], str(path)))
        rank = A.shape[0]
        layers[module] = LoraLayer(A, B, alpha if alpha else float(rank))
    if needs_heads:
        raise FormatError(
            f"{path}: {len(needs_heads)} q/k factor(s), e.g. {needs_heads[0]}, are in llama.cpp's rotary row order and the file "
            "does not record the head counts needed to undo it; pass the base (base=, --base: HF checkpoint directory, Hub id or the base's .gguf)"
        )
    if not layers:
        raise FormatError(f"{path}: no LoRA tensor pairs")
    metadata: dict[str, Any] = {"gguf_architecture": arch.name, "gguf_alpha": alpha}
    if BASE_MODEL_KEY in meta:
        metadata["base_model"] = meta[BASE_MODEL_KEY]
    if ignored:
        metadata["gguf_ignored_tensors"] = ignored
    return Adapter(layers, metadata)


def write(adapter: Adapter, path: Path, *, base: str | os.PathLike | GGUFBase | None = None) -> None:
    """Write ``adapter`` as a llama.cpp LoRA GGUF for ``base``; every layer's delta is kept exactly."""
    if base is None:
        raise FormatError(
            "a GGUF adapter needs its base model (base= in Python; on the command line, convert --to gguf --base, or train): "
            "a HF checkpoint directory, a Hub repo id, or the base's .gguf file, for the architecture and llama.cpp's tensor names"
        )
    if adapter.is_dora:
        raise UnsupportedOperationError("DoRA adapters cannot be written as GGUF: llama.cpp applies plain LoRA only; merge it into the base instead")
    if not adapter:
        raise FormatError("cannot save an adapter with no layers")
    info = describe_base(base)
    arch = info.architecture
    if arch.rope_permute and set(arch.rope_permute.values()) - set(info.heads):
        raise FormatError(f"{info.source}: the base does not give its attention head counts, which llama.cpp's q/k row order needs")
    targets = tensor_names(adapter, info)
    file_alpha = _file_alpha(adapter)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in targets.items():
        layer = adapter[name]
        file_scale = file_alpha / layer.rank if file_alpha else 1.0  # what llama.cpp will multiply by
        A, B = _stored(layer.A), _stored(layer.B)
        if layer.scale != file_scale:  # fold the difference into B, computed in float64
            B = (layer.B.double() * (layer.scale / file_scale)).float()
        n_head = _heads_for(arch, tensor, info.heads, B.shape[0], name) if arch.head_key(tensor) else None
        if n_head is not None:
            B = rope_permute(B, n_head)
        tensors[tensor + _LORA_A] = A  # (r, in): ggml ne = [in, r]
        tensors[tensor + _LORA_B] = B  # (out, r): ggml ne = [r, out]
    metadata: dict[str, Any] = {
        "general.architecture": arch.name,
        "general.type": "adapter",
        "adapter.type": "lora",
        ALPHA_KEY: float(file_alpha),
        MODULES_KEY: [f"{tensor}={name}" for name, tensor in targets.items()],
    }
    if arch.rope_permute:
        metadata[HEADS_KEY], metadata[KV_HEADS_KEY] = info.heads["head_count"], info.heads["head_count_kv"]
    if adapter.metadata.get("base_model"):
        metadata[BASE_MODEL_KEY] = str(adapter.metadata["base_model"])
    write_gguf(path, metadata, tensors)


def tensor_names(adapter: Adapter, info: GGUFBase) -> dict[str, str]:
    """Adapter layer -> GGUF tensor name, checking everything against the base; all problems at once."""
    arch, targets, problems = info.architecture, {}, []
    for name, layer in adapter.items():
        tensor = arch.to_gguf(name)
        if tensor is None:
            problems.append(f"{name} has no llama.cpp tensor in a {arch.name} model")
            continue
        if tensor in targets.values():
            problems.append(f"{name} and another layer both map to {tensor}")
        bid = re.match(r"blk\.(\d+)\.", tensor)
        if bid and info.block_count is not None and int(bid[1]) >= info.block_count:
            problems.append(f"{name}: the base has {info.block_count} layers")
        elif tensor == "output" and info.tied_embeddings:
            problems.append(f"{name}: the base ties lm_head to the token embeddings, so llama.cpp has no output tensor to adapt")
        elif info.shapes is not None and tensor not in info.shapes:
            problems.append(f"{name}: the base has no tensor {tensor}.weight")
        elif info.shapes is not None and tuple(info.shapes[tensor]) != layer.shape:
            problems.append(f"{name} is {list(layer.shape)} but the base's {tensor}.weight is {list(info.shapes[tensor])}")
        targets[name] = tensor
    if problems:
        kinds = ", ".join(sorted({hf.rsplit(".", 1)[-1] for hf in arch.tensors}))
        raise BaseMismatchError(
            f"{len(problems)} problem(s) against the base {info.source}: {'; '.join(problems[:5])}"
            + (f"; ... and {len(problems) - 5} more" if len(problems) > 5 else "")
            + f" (llama.cpp adapts {kinds} in {arch.name} models)"
        )
    return targets


def _file_alpha(adapter: Adapter) -> float:
    """The one file alpha that leaves the most layers' ``B`` untouched.

    A layer needs no folding when the file alpha equals its own (``alpha / r`` then matches for any
    rank) or when the file alpha is 0 and its scale is 1. Ties prefer a nonzero alpha.
    """
    votes = Counter(layer.alpha for layer in adapter.values() if layer.alpha != 0.0)
    votes[0.0] = sum(1 for layer in adapter.values() if layer.scale == 1.0)
    best = max(votes, key=lambda a: (votes[a], a != 0.0))
    return float(np.float32(best))  # as llama.cpp will read it


def _stored(t: torch.Tensor) -> torch.Tensor:
    """Factors keep float32/float16/bfloat16; float64 (which ggml cannot multiply) becomes float32."""
    t = t.detach().cpu()
    return t if t.dtype in (torch.float32, torch.float16, torch.bfloat16) else t.float()
