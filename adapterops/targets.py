"""What each consumer of an adapter accepts, in one place: vLLM, llama.cpp, PEFT and transformers.

``check(source, target)`` lists every reason ``target`` would refuse or mis-apply an adapter;
``prepare(source, target)`` returns the adapter rewritten so that it loads there, with what that
cost, or raises with the reasons that cannot be fixed. ``complete_metadata`` fills in what PEFT's
loaders read from ``adapter_config.json`` (``task_type``, ``base_model_name_or_path``); every
writer calls it.

The rules, and where they were read (the consumers' own code):

- vLLM 0.32 (``vllm/config/lora.py``, ``vllm/lora/peft_helper.py``, ``vllm/lora/lora_model.py``,
  ``vllm/lora/worker_manager.py``, ``vllm/lora/utils.py``): ``max_lora_rank`` is one of
  ``MaxLoRARanks`` = 1, 8, 16, 32, 64, 128, 256, 320, 512 (default 16) and the largest of ``r`` and
  ``rank_pattern`` must not exceed it; ``PEFTHelper._validate_features`` refuses ``use_dora``,
  ``lora_bias``, ``modules_to_save`` other than a classifier head, ``bias != "none"``, and the
  PiSSA/OLoRA/LoftQ-style ``init_lora_weights``, aLoRA, ``layer_replication``, BD-LoRA and
  QALoRA; it loads only ``adapter_model.safetensors`` (or pickles, never written here) from a
  directory with ``adapter_config.json``; a module whose last name is not one vLLM wraps (the
  model's linear layers, with ``packed_modules_mapping`` unpacked, plus ``embed_tokens`` and
  ``lm_head``) is refused as "unexpected". ``rank_pattern`` / ``alpha_pattern`` are resolved per
  module as PEFT does (``get_rank_and_scaling``), and rsLoRA is honoured.
- llama.cpp (``src/llama-adapter.h``, ``llama_adapter_lora_weight::get_scale``: ``alpha ? alpha /
  rank : 1`` with ``rank`` the tensor's own; ``convert_lora_to_gguf.py`` writes the config's
  ``lora_alpha`` alone): one ``adapter.lora.alpha`` per file, so per-layer alphas
  (``alpha_pattern``) and mixed ranks under one alpha come out wrong through that converter; DoRA
  is not supported; only architectures and tensors with a llama.cpp name can be adapted (the name
  map ``formats/gguf_names.json``).
- PEFT 0.21 (``peft/auto.py``, ``peft/config.py``): ``AutoPeftModelForCausalLM`` reads
  ``base_model_name_or_path`` to load the base and needs ``task_type`` (``CAUSAL_LM`` for it);
  ``PeftModel.from_pretrained`` and transformers' ``load_adapter`` need a directory whose
  ``target_modules`` exist in the model with the shapes of the factors.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .adapter import Adapter, LoraLayer
from .errors import AdapterOpsError, FormatError, UnsupportedOperationError

__all__ = [
    "TARGETS",
    "TASK_TYPES",
    "VLLM_MAX_LORA_RANKS",
    "VLLM_DEFAULT_MAX_LORA_RANK",
    "Problem",
    "CheckReport",
    "check",
    "prepare",
    "complete_metadata",
    "canonical_base",
    "task_type_of",
]

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py, MaxLoRARanks
VLLM_DEFAULT_MAX_LORA_RANK = 16  # LoRAConfig.max_lora_rank

# Module names vLLM wraps with LoRA, per architecture: its linear layers with packed_modules_mapping
# unpacked (qkv_proj -> q/k/v_proj, gate_up_proj -> gate/up_proj), and embedding_modules
# (vllm/model_executor/models/{llama,qwen2,qwen3,gemma2,phi3}.py).
_LLAMA_LIKE = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"})
VLLM_MODULES: dict[str, frozenset[str]] = {
    **dict.fromkeys(
        ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GemmaForCausalLM",
         "Gemma2ForCausalLM", "GraniteForCausalLM"],
        _LLAMA_LIKE,
    ),
    "Phi3ForCausalLM": frozenset({"qkv_proj", "o_proj", "gate_up_proj", "down_proj", "embed_tokens", "lm_head"}),
}

# PEFT's TaskType, picked from the suffix of the base's architecture class in config.json.
TASK_TYPES: dict[str, str] = {
    "ForCausalLM": "CAUSAL_LM",
    "LMHeadModel": "CAUSAL_LM",
    "ForSeq2SeqLM": "SEQ_2_SEQ_LM",
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
    "Model": "FEATURE_EXTRACTION",
}
PEFT_TASK_TYPES = ("CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")  # peft.TaskType
_SEQ2SEQ_TYPES = {"t5", "mt5", "bart", "mbart", "pegasus", "marian", "umt5", "longt5", "led"}


@dataclass(frozen=True)
class Problem:
    """One reason a consumer refuses or mis-applies an adapter; ``fix`` says what ``prepare`` does about it."""

    rule: str
    message: str
    fix: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "message": self.message, "fixable": self.fix is not None, "fix": self.fix}


@dataclass(frozen=True)
class CheckReport:
    """What ``check`` found: ``ok`` when ``problems`` is empty; ``notes`` say what could not be checked."""

    target: str
    source: str
    problems: tuple[Problem, ...]
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "source": self.source, "ok": self.ok,
                "problems": [p.to_dict() for p in self.problems], "notes": list(self.notes)}


@dataclass(frozen=True)
class _Facts:
    """What a consumer sees of an adapter: its file layout, config, stray tensors and layers."""

    source: str
    format: str  # peft | native | kohya | value (an Adapter in memory, checked as it would be written)
    config: Mapping[str, Any]  # adapter_config.json as the consumer reads it ({} for kohya)
    extras: tuple[str, ...]  # tensor keys that are not LoRA factors (biases, modules_to_save, embeddings)
    adapter: Adapter
    base: Any = None  # a Checkpoint, when --base was a safetensors checkpoint
    options: Mapping[str, Any] = field(default_factory=dict)
    gguf_base: Any = None  # a GGUFBase, when --base was a model's .gguf file (llama.cpp only)

    @property
    def architecture(self) -> str | None:
        if self.gguf_base is not None:
            return self.gguf_base.architecture.hf_architectures[0]
        config = (self.base.config() if self.base is not None else None) or _cached_base_config(self.adapter.metadata.get("base_model"))
        architectures = (config or {}).get("architectures") or []
        return str(architectures[0]) if architectures else None


Rule = Callable[[_Facts], Iterable[Problem]]
_RULES: dict[str, list[Rule]] = {}
_NOTES: dict[str, list[Callable[[_Facts], Iterable[str]]]] = {}


def _rule(*targets: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for target in targets:
            _RULES.setdefault(target, []).append(fn)
        return fn

    return register


TARGETS = ("vllm", "llama.cpp", "peft", "transformers")


# ---------------------------------------------------------------- metadata PEFT's loaders need


def canonical_base(base: str | os.PathLike | None) -> str | None:
    """``base`` as another process can find it: an existing local path made absolute, a Hub id as it is."""
    if base is None:
        return None
    path = Path(base).expanduser()
    if path.exists():
        return str(path.resolve())
    return str(base)


def task_type_of(config: Mapping[str, Any] | None) -> str | None:
    """PEFT's ``task_type`` for a base with this ``config.json`` (``CAUSAL_LM`` for ``LlamaForCausalLM``), or None."""
    for architecture in (config or {}).get("architectures") or []:
        if str(architecture).endswith("ForConditionalGeneration"):
            return "SEQ_2_SEQ_LM" if config.get("model_type") in _SEQ2SEQ_TYPES or config.get("is_encoder_decoder") else "CAUSAL_LM"
        for suffix, task in TASK_TYPES.items():
            if str(architecture).endswith(suffix):
                return task
    return None


def complete_metadata(adapter: Adapter, *, base: str | os.PathLike | None = None, task_type: str | None = None) -> Adapter:
    """``adapter`` with ``base_model`` a Hub id or an absolute path and ``task_type`` filled in where it can be.

    ``base`` overrides the recorded base; ``task_type`` (one of PEFT's TaskType names) overrides
    what the base's ``config.json`` implies. A base that is neither local nor in the Hugging Face
    cache leaves ``task_type`` as it was (nothing is downloaded).
    """
    if task_type is not None and task_type not in PEFT_TASK_TYPES:
        raise AdapterOpsError(f"task type {task_type!r} is not one of PEFT's: {', '.join(PEFT_TASK_TYPES)}")
    base_model = canonical_base(base if base is not None else adapter.metadata.get("base_model"))
    task = task_type or adapter.metadata.get("task_type") or task_type_of(_cached_base_config(base_model))
    updates = {k: v for k, v in {"base_model": base_model, "task_type": task}.items() if v is not None and adapter.metadata.get(k) != v}
    return adapter.with_metadata(**updates) if updates else adapter


def _cached_base_config(base: str | None) -> dict[str, Any] | None:
    """The ``config.json`` of a local base directory, or of a Hub id already in the cache; else None."""
    if not base:
        return None
    path = Path(base)
    file = path / "config.json" if path.is_dir() else path.parent / "config.json" if path.is_file() else None
    if file is None:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(base), "config.json")
        except Exception:  # not a repo id, or no cache: nothing to infer from
            return None
        file = Path(cached) if isinstance(cached, str) else None
    if file is None or not file.is_file():
        return None
    from ._files import read_json

    try:
        config = read_json(file)
    except FormatError:
        return None
    return config if isinstance(config, dict) else None


# ---------------------------------------------------------------- reading what a consumer sees


def _bases(base: Any, target: str) -> tuple[Any, Any]:
    """(Checkpoint, GGUFBase) for ``--base``: a model's .gguf file is a base for llama.cpp only."""
    from .checkpoint import Checkpoint
    from .formats._gguf_file import is_gguf

    if base is None or hasattr(base, "names"):
        return base, None
    if Path(base).is_file() and is_gguf(Path(base)):
        if target != "llama.cpp":
            raise FormatError(f"{base}: a GGUF model is a base for --target llama.cpp; {target} runs on the safetensors checkpoint: pass that")
        from .formats.gguf import describe_base

        return None, describe_base(base)
    return Checkpoint(base), None


def _facts(source: Adapter | str | os.PathLike, *, target: str, base: Any = None, revision: str | None = None, **options: Any) -> _Facts:
    from .formats import _natural_key, load, locate, peft

    checkpoint, gguf_base = _bases(base, target)
    base_source = checkpoint.source if checkpoint is not None else gguf_base.source if gguf_base is not None else None
    if isinstance(source, Adapter):
        _, config = peft.to_state_dict(complete_metadata(source, base=None if checkpoint is None else checkpoint.source))
        return _Facts("adapter", "value", config, (), source, checkpoint, options, gguf_base)
    path, fmt = locate(source, revision=revision)
    if fmt not in ("peft", "native"):  # kohya, gguf: no PEFT config to read
        return _Facts(str(source), fmt, {}, (), load(path, allow_nonfinite=True, base=base_source), checkpoint, options, gguf_base)
    from . import _files

    if fmt == "peft":
        directory = path if path.is_dir() else path.parent
        config = _files.read_json(directory / peft.CONFIG_NAME)
        tensors, _ = _files.read_safetensors(directory / peft.WEIGHTS_NAME)
    else:
        from .formats import native

        tensors, header = _files.read_safetensors(path)
        config = _files.header_json(path, header, native.CONFIG_KEY)
    if not isinstance(config, dict):
        raise FormatError(f"{source}: adapter_config is not a JSON object")
    extras = tuple(k for k in tensors if not peft.is_factor_key(k))
    factors = {k: v for k, v in tensors.items() if k not in extras}
    adapter = peft.from_state_dict(factors, config, source=str(source))
    adapter = Adapter({n: adapter[n] for n in sorted(adapter, key=_natural_key)}, adapter.metadata)
    return _Facts(str(source), fmt, config, extras, adapter, checkpoint, options, gguf_base)


def check(
    source: Adapter | str | os.PathLike,
    target: str,
    *,
    max_lora_rank: int = VLLM_DEFAULT_MAX_LORA_RANK,
    base: str | os.PathLike | None = None,
    revision: str | None = None,
) -> CheckReport:
    """Every reason ``target`` (vllm, llama.cpp, peft, transformers) would refuse or mis-apply ``source``.

    ``source`` is an adapter path, Hub id or an Adapter (checked as adapterops would write it as
    PEFT). ``base`` (a checkpoint directory or Hub id; for llama.cpp also the model's .gguf) adds
    the checks that need the model: modules and shapes, architecture, DoRA conversion.
    """
    _check_target(target)
    _check_max_rank(max_lora_rank)
    facts = _facts(source, target=target, base=base, revision=revision, max_lora_rank=max_lora_rank)
    problems = _problems(facts, target)
    notes = [n for note in _NOTES.get(target, []) for n in note(facts)]
    return CheckReport(target, facts.source, tuple(problems), tuple(notes))


def _problems(facts: _Facts, target: str) -> list[Problem]:
    return [p for rule in _RULES[target] for p in rule(facts)]


def _check_target(target: str) -> None:
    if target not in TARGETS:
        raise AdapterOpsError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")


def _check_max_rank(max_lora_rank: int) -> None:
    if max_lora_rank not in VLLM_MAX_LORA_RANKS:
        allowed = ", ".join(map(str, VLLM_MAX_LORA_RANKS))
        raise AdapterOpsError(f"max_lora_rank {max_lora_rank} is not a value vLLM accepts ({allowed})")


def _some(names: list[str]) -> str:
    return f"{len(names)} layer{'s' if len(names) != 1 else ''}, e.g. {names[0]}"


# ---------------------------------------------------------------- the rules


@_rule("vllm", "peft", "transformers")
def _directory(f: _Facts) -> Iterable[Problem]:
    if f.format not in ("peft", "value"):
        yield Problem("format", f"loads a PEFT directory (adapter_config.json + adapter_model.safetensors); this is a {f.format} file",
                      fix="written as a PEFT directory")


@_rule("vllm")
def _vllm_features(f: _Facts) -> Iterable[Problem]:
    """``PEFTHelper._validate_features`` and ``validate_legal`` (vllm/lora/peft_helper.py)."""
    c = f.config
    heads = [m for m in c.get("modules_to_save") or [] if m not in ("classifier", "score")]
    if heads:
        yield Problem("modules_to_save", f"modules_to_save {heads} is not supported (only a classifier/score head is)")
    if c.get("bias", "none") != "none" or any(k.endswith(".bias") for k in f.extras):
        yield Problem("bias", f"adapter bias is not supported (bias={c.get('bias', 'none')!r})")
    if c.get("lora_bias"):
        yield Problem("bias", "LoRA bias (lora_bias) is not supported")
    init = c.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in ("gaussian", "eva", "orthogonal", "mica", "lora_ga"):
        yield Problem("init", f"init_lora_weights={init!r} changes the base weights when PEFT loads it, which vLLM does not do")
    for key, what in [("alora_invocation_tokens", "Activated LoRA (aLoRA)"), ("layer_replication", "layer_replication"),
                      ("use_bdlora", "block-diagonal LoRA (BD-LoRA)"), ("use_qalora", "QALoRA")]:  # fmt: skip
        if c.get(key):
            yield Problem("feature", f"{what} is not supported")
    stray = [k for k in f.extras if not k.endswith(".bias") and not any(f".{m}." in f".{k}" for m in c.get("modules_to_save") or [])]
    if stray:
        yield Problem("tensors", f"{len(stray)} tensor(s) that are not LoRA factors, e.g. {stray[0]}")


@_rule("vllm")
def _vllm_rank(f: _Facts) -> Iterable[Problem]:
    cap = f.options["max_lora_rank"]
    over = sorted((n for n, layer in f.adapter.items() if layer.rank > cap), key=lambda n: -f.adapter[n].rank)  # largest first
    if over:
        yield Problem("rank", f"rank {f.adapter.rank} is greater than max_lora_rank {cap} ({_some(over)})",
                      fix=f"re-compressed optimally to at most rank {cap}")


@_rule("vllm", "llama.cpp")
def _dora(f: _Facts) -> Iterable[Problem]:
    dora = [n for n, layer in f.adapter.items() if layer.is_dora]
    if dora or f.config.get("use_dora"):
        yield Problem("dora", f"DoRA is not supported ({_some(dora) if dora else 'use_dora is set'})",
                      fix="turned into a plain LoRA of the same merged effect (needs --base)")


@_rule("vllm")
def _vllm_modules(f: _Facts) -> Iterable[Problem]:
    allowed = VLLM_MODULES.get(f.architecture or "")
    if allowed is None:
        return
    bad = [n for n in f.adapter if n.rsplit(".", 1)[-1] not in allowed]
    if bad:
        yield Problem("modules", f"{f.architecture} adapts only {', '.join(sorted(allowed))} ({_some(bad)} target other modules)")


def _vllm_notes(f: _Facts) -> Iterable[str]:
    if f.architecture is None:
        yield "architecture unknown (pass --base): target modules not checked"
    elif f.architecture not in VLLM_MODULES:
        yield f"{f.architecture}: adapterops does not list which modules vLLM adapts on it; target modules not checked"


_NOTES["vllm"] = [_vllm_notes]


@_rule("llama.cpp")
def _llama_cpp_alpha(f: _Facts) -> Iterable[Problem]:
    """llama.cpp scales every tensor by the file's one alpha over that tensor's rank."""
    if f.format == "gguf":
        return
    alpha = f.config.get("lora_alpha", f.config.get("r"))
    if alpha is None:
        return
    wrong = [n for n, layer in f.adapter.items() if not _close(float(alpha) / layer.rank, layer.scale)]
    if wrong:
        n = wrong[0]
        got, want = float(alpha) / f.adapter[n].rank, f.adapter[n].scale
        yield Problem("alpha", f"one alpha per file ({alpha:g}, over each tensor's rank) mis-scales {_some(wrong)} through "
                               f"convert_lora_to_gguf.py (llama.cpp would apply {got:.4g} where the adapter means {want:.4g})",
                      fix="exported with `adapterops convert --to gguf --base B`, which folds every scale exactly")


@_rule("llama.cpp")
def _llama_cpp_names(f: _Facts) -> Iterable[Problem]:
    if f.architecture is None:
        return
    from .formats.gguf import ARCHITECTURES  # the name map the GGUF writer uses

    arch = next((a for a in ARCHITECTURES.values() if f.architecture in a.hf_architectures), None)
    if arch is None:
        supported = sorted({h for a in ARCHITECTURES.values() for h in a.hf_architectures})
        yield Problem("architecture", f"{f.architecture} is not an architecture adapterops can name for llama.cpp (supported: {', '.join(supported)})")
        return
    patterns = [re.compile("^" + re.escape(k).replace(re.escape("{bid}"), r"\d+") + "$") for k in arch.tensors]
    bad = [n for n in f.adapter if not any(p.match(n) for p in patterns)]
    if bad:
        yield Problem("modules", f"{_some(bad)} have no llama.cpp tensor name on {arch.name}")


@_rule("llama.cpp")
def _llama_cpp_base(f: _Facts) -> Iterable[Problem]:
    """With the base (its .gguf or its checkpoint): each layer with a llama.cpp name fits one of its tensors."""
    if f.base is None and f.gguf_base is None:
        return
    from .errors import BaseMismatchError
    from .formats.gguf import describe_base, tensor_names

    try:
        info = f.gguf_base if f.gguf_base is not None else describe_base(f.base.source)
    except FormatError:  # an architecture llama.cpp has no names for: _llama_cpp_names says so
        return
    named = Adapter({n: layer for n, layer in f.adapter.items() if info.architecture.to_gguf(n) is not None}, f.adapter.metadata)
    try:
        tensor_names(named, info)
    except BaseMismatchError as exc:
        yield Problem("base", str(exc))


def _llama_cpp_notes(f: _Facts) -> Iterable[str]:
    if f.architecture is None:
        yield "architecture unknown (pass --base): module names not checked"


_NOTES["llama.cpp"] = [_llama_cpp_notes]


@_rule("peft")
def _peft_auto(f: _Facts) -> Iterable[Problem]:
    """``AutoPeftModelForCausalLM.from_pretrained(dir)`` loads the base named in the config for the config's task type."""
    task = f.config.get("task_type")
    if task is None:
        yield Problem("task_type", "task_type is not set, so AutoPeftModelForCausalLM refuses it",
                      fix="set from the base's architecture (--base), or --task-type")
    elif task not in PEFT_TASK_TYPES:
        yield Problem("task_type", f"task_type {task!r} is not one of PEFT's ({', '.join(PEFT_TASK_TYPES)})", fix="replaced by --task-type")
    base = f.config.get("base_model_name_or_path")
    if not base:
        yield Problem("base_model", "base_model_name_or_path is not set, so AutoPeftModel cannot find the base", fix="set from --base")
    elif not isinstance(base, str):
        yield Problem("base_model", f"base_model_name_or_path is {type(base).__name__} {str(base)[:40]}, not a Hub id or path", fix="set from --base")
    elif not Path(base).is_absolute() and Path(base).exists():
        yield Problem("base_model", f"base_model_name_or_path {base!r} is a relative path, which resolves only from this directory",
                      fix="made absolute")
    elif Path(base).is_absolute() and not Path(base).exists():
        yield Problem("base_model", f"base_model_name_or_path {base!r} does not exist", fix="set from --base")


@_rule("peft", "transformers", "vllm")
def _base_fit(f: _Facts) -> Iterable[Problem]:
    """With the base at hand: every layer must name one of its weights, with the factors' shapes."""
    if f.base is None:
        return
    from .checkpoint import match_layers
    from .errors import BaseMismatchError

    try:
        match_layers({n: layer.shape for n, layer in f.adapter.items()}, f.base, fan_in_fan_out=bool(f.config.get("fan_in_fan_out")))
    except BaseMismatchError as exc:
        yield Problem("base", f"does not fit the base: {exc}")
    exact = [n for n in f.adapter if f"{n}.weight" not in f.base]
    if exact and f.format != "kohya":
        yield Problem("names", f"module names must be the base's own ({_some(exact)} are not, e.g. no {exact[0]}.weight in the base)")


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(abs(a), abs(b), 1e-30)


# ---------------------------------------------------------------- fixing what can be fixed


def prepare(
    source: Adapter | str | os.PathLike,
    target: str,
    *,
    max_lora_rank: int = VLLM_DEFAULT_MAX_LORA_RANK,
    base: str | os.PathLike | None = None,
    task_type: str | None = None,
    revision: str | None = None,
) -> tuple[Adapter, dict[str, Any]]:
    """``source`` rewritten to load in ``target`` (vllm, peft, transformers) as a PEFT directory, and what it cost.

    - rank over ``max_lora_rank`` (vllm): the layers over it are re-compressed optimally to that
      rank (Eckart-Young); ``energy_kept = ||delta_k||^2 / ||delta||^2`` per layer is reported.
    - DoRA (vllm): with ``base``, each DoRA layer becomes the best rank-``max_lora_rank`` LoRA of
      ``W' - W``, where ``W' = m * (W + s B A) / ||W + s B A||_row`` is the DoRA-merged weight
      (Liu et al. 2024, eq. 5); without it, refused.
    - scales (vllm): folded into B, ``alpha = rank`` on every layer, so ``lora_alpha == r`` and the
      file means the same to readers that resolve ``alpha_pattern`` and to those that do not.
    - ``task_type`` and ``base_model_name_or_path`` completed (``complete_metadata``).

    Anything else ``check`` reports raises UnsupportedOperationError with every reason.
    """
    _check_target(target)
    if target == "llama.cpp":
        raise UnsupportedOperationError("llama.cpp reads GGUF adapters: use `adapterops convert X --to gguf --base B` (format='gguf')")
    _check_max_rank(max_lora_rank)
    facts = _facts(source, target=target, base=base, revision=revision, max_lora_rank=max_lora_rank)
    problems = _problems(facts, target)
    blocking = [p for p in problems if p.fix is None or (p.rule == "dora" and base is None)]
    if blocking:
        reasons = "; ".join(p.message + (" (pass --base to convert it)" if p.rule == "dora" else "") for p in blocking)
        raise UnsupportedOperationError(f"{facts.source} cannot be made to load in {target}: {reasons}")
    adapter, layers = facts.adapter, {}
    if target == "vllm":
        adapter, layers = _fit_vllm(adapter, max_lora_rank, facts.base)
    adapter = complete_metadata(adapter, base=base, task_type=task_type)
    result = _facts(adapter, target=target, base=facts.base, max_lora_rank=max_lora_rank)
    left = _problems(result, target)
    if left:
        raise UnsupportedOperationError(f"{facts.source} cannot be made to load in {target}: " + "; ".join(p.message for p in left))
    report = {
        "target": target,
        "fixed": [f"{p.rule}: {p.message} -> {p.fix}" for p in problems],
        "layers": layers,
        "max_lora_rank": max_lora_rank if target == "vllm" else None,
        "energy_kept_min": min((r["energy_kept"] for r in layers.values()), default=1.0),
    }
    return adapter, report


def _fit_vllm(adapter: Adapter, cap: int, base: Any) -> tuple[Adapter, dict[str, dict[str, Any]]]:
    """DoRA layers to plain LoRA, ranks to at most ``cap``, scales folded (alpha = rank everywhere)."""
    layers: dict[str, LoraLayer] = {}
    report: dict[str, dict[str, Any]] = {}
    dora = Adapter({n: layer for n, layer in adapter.items() if layer.is_dora})
    over = Adapter({n: layer for n, layer in adapter.items() if not layer.is_dora and layer.rank > cap})
    if dora:
        for name, (layer, kept) in _dora_to_lora(dora, base, cap).items():
            layers[name] = layer
            report[name] = {"change": "dora", "rank_before": dora[name].rank, "rank": layer.rank, "energy_kept": kept}
    if over:
        small = over.compress(rank=cap)
        before, error = over.norm(per_layer=True), (over - small).norm(per_layer=True)
        for name in over:
            kept = 1.0 - (error[name] / before[name]) ** 2 if before[name] else 1.0
            if name in small:
                layers[name] = small[name]
            report[name] = {"change": "rank", "rank_before": over[name].rank, "rank": small[name].rank if name in small else 0, "energy_kept": kept}
    out = {}
    for name, layer in adapter.items():
        if name in layers:
            out[name] = layers[name]
        elif name not in report:  # untouched: fold the scale so that alpha == rank
            B, A = layer.folded(dtype=torch.promote_types(layer.A.dtype, layer.B.dtype))
            out[name] = LoraLayer(A, B.to(layer.B.dtype), float(layer.rank))
    meta = {k: v for k, v in adapter.metadata.items() if k not in ("format", "source")}
    return Adapter(out, meta), report


def _dora_to_lora(dora: Adapter, base: Any, rank: int) -> dict[str, tuple[LoraLayer, float]]:
    """Per DoRA layer: the best rank-``rank`` LoRA of (DoRA-merged W) - W, and the energy it keeps."""
    from .checkpoint import match_layers
    from .merging import merge_into

    targets = match_layers({n: layer.shape for n, layer in dora.items()}, base)
    out = {}
    for name, layer in dora.items():
        t = targets[name]
        W = base.read(t.tensor)
        if not W.is_floating_point():
            raise UnsupportedOperationError(f"{t.tensor}: the base stores it quantized ({base.entry(t.tensor).dtype}); pass the bf16/fp16 base")
        W = W.to(torch.float64).mT if t.transposed else W.to(torch.float64)  # (out, in)
        module = torch.nn.ModuleDict({"w": torch.nn.Linear(W.shape[1], W.shape[0], bias=False, dtype=torch.float64)})
        with torch.no_grad():
            module["w"].weight.copy_(W)
        merge_into(Adapter({"w": layer.to(dtype=torch.float64)}), module)  # the DoRA formula lives in merging
        D = module["w"].weight.detach() - W  # (out, in)
        U, S, Vh = torch.linalg.svd(D, full_matrices=False)
        k = max(1, min(rank, int((S > S[0] * 1e-12).sum()) if S[0] > 0 else 1))
        root = S[:k].sqrt()
        total = float((S**2).sum())
        kept = float((S[:k] ** 2).sum()) / total if total else 1.0
        dtype = torch.promote_types(layer.A.dtype, layer.B.dtype)
        out[name] = (LoraLayer((root[:, None] * Vh[:k]).to(dtype), (U[:, :k] * root).to(dtype), float(k)), kept)  # (k, in), (out, k)
    return out
