"""A seeded mutator over real files of every adapter format (GGUF included) and of a sharded base checkpoint.

Each mutant (truncation, byte flips in header and data, header JSON edits of offsets, dtypes,
shapes, keys and metadata, config and index JSON edits) must either raise an AdapterOpsError, or
load to exactly what an independent reading gives: safetensors' own reader for the bytes (so
nothing safetensors refuses is accepted), PEFT's ``get_pattern_key`` and ``LoraConfig`` defaults
for ranks and alphas, sd-scripts' rule for kohya alphas, the gguf package (llama.cpp's reader)
for GGUF tensor shapes. Never another exception type, never a
hang: each case runs under a timeout (a hang detector, generous for a shared CI machine).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import struct
import threading
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig  # imported here, not under a case's timeout: the first import is slow
from peft.utils.other import get_pattern_key
from safetensors import safe_open
from safetensors.torch import load_file
from test_safety_inputs import tiny_base

import adapterops as ao
from adapterops import Adapter, LoraLayer
from adapterops.checkpoint import Checkpoint
from adapterops.errors import AdapterOpsError
from adapterops.formats import kohya

SEED = 20261203
TIMEOUT = 10.0  # seconds per case; a hang (exponential regex, unbounded loop) never finishes at all
MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.0.mlp.down_proj"]
# Keys that can never match a name in MODULES (no 'z' or 'b' there), and that backtracking
# regex engines take forever on: the oracle leaves them out instead of evaluating them.
CATASTROPHIC = ["(.|.)*z", "(a|aa)*b", "((a+)+)+z"]
PATTERN_KEYS = ["q_proj", "v_proj", r"layers\.\d+\.self_attn\.q_proj", "model.layers.0.mlp.down_proj", ".*", "(", r"(a)\1",
                "q_proj|v_proj", "(?i)x", *CATASTROPHIC]
ODD_VALUES = [None, 0, -1, 1.5, "8", True, [], {}, 1e308, 3, 2, 4, 8]
CONFIG_FIELDS = ["r", "lora_alpha", "peft_type", "use_rslora", "alpha_pattern", "rank_pattern", "use_dora", "fan_in_fan_out"]
DTYPES = ["F16", "BF16", "F32", "F64", "I32", "I64", "U8", "BOOL", "F8_E4M3", "C64", "F4", "U64", "X"]


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    g = torch.Generator().manual_seed(0)
    shapes = [(8, 6, 2, 4.0), (8, 6, 3, 6.0), (6, 8, 2, 1.5)]
    adapter = Adapter({m: LoraLayer(torch.randn(r, i, generator=g), torch.randn(o, r, generator=g), a) for m, (o, i, r, a) in zip(MODULES, shapes)})
    adapter.save(root / "native.st")
    adapter.save(root / "peft", format="peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter.save(root / "kohya.safetensors", format="kohya")
    tiny_base(root / "base")
    return root


# ---------------------------------------------------------------- mutators


def split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def mutate_config(rng: random.Random, config: dict) -> object:
    op = rng.choice(["drop", "value", "pattern", "pattern", "rslora", "not an object"])
    config = json.loads(json.dumps(config))
    if op == "drop":
        config.pop(rng.choice(CONFIG_FIELDS), None)
    elif op == "value":
        config[rng.choice(CONFIG_FIELDS)] = rng.choice(ODD_VALUES)
    elif op == "pattern":
        field = rng.choice(["alpha_pattern", "rank_pattern"])
        patterns = config.get(field) if isinstance(config.get(field), dict) else {}
        patterns = {rng.choice(PATTERN_KEYS): rng.choice([1, 2, 3, 4, 8, 0.5, "x", 0]), **patterns} if rng.random() < 0.5 else {**patterns, rng.choice(PATTERN_KEYS): rng.choice([2, 3, 4, 8])}
        config[field] = patterns
    elif op == "rslora":
        config["use_rslora"] = True
    else:
        return rng.choice([[1, 2], "LORA", 7])
    return config


def mutate_header(rng: random.Random, header: dict, meta_key: str | None) -> None:
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names) if names else None
    op = rng.choice(["offsets", "dtype", "shape", "delete", "rename", "add", "metadata", "metadata"] if name else ["add", "metadata"])
    if op == "offsets":
        b, e = header[name]["data_offsets"]
        d = rng.choice([-8, -1, 1, 4, 8, 1 << 40])
        header[name]["data_offsets"] = rng.choice([[b + d, e + d], [b, e + d], [-8, e], [e, b], [b, 2**64], "x", [b], [b, e, 0]])
    elif op == "dtype":
        header[name]["dtype"] = rng.choice(DTYPES)
    elif op == "shape":
        shape = list(header[name]["shape"])
        header[name]["shape"] = rng.choice([shape + [1], shape[::-1], [0] + shape[1:], [-1] + shape[1:], [2**40] + shape[1:],
                                            ["3"] + shape[1:], [True] + shape[1:], shape[:-1], [], [shape[0] * 2, shape[-1] // 2]])
    elif op == "delete":
        del header[name]
    elif op == "rename":
        header[name.replace("lora", rng.choice(["lora", "Lora", "lora_"]), 1) + rng.choice(["", ".weight", ".default"])] = header.pop(name)
    elif op == "add":
        header[rng.choice(["extra", f"base_model.model.{MODULES[0]}.lora_A.default.weight", "lora_x.alpha"])] = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    else:
        meta = header.get("__metadata__") or {}
        if meta_key and meta_key in meta and rng.random() < 0.7:
            value = json.loads(meta[meta_key])
            if meta_key == kohya.MODULES_KEY:
                keys = list(value) or ["lora_x"]
                value[rng.choice(keys)] = rng.choice([MODULES[0], "a.b", 3, MODULES[1]])
            else:
                value = mutate_config(rng, value)
            meta[meta_key] = json.dumps(value) if rng.random() < 0.9 else json.dumps(value)[:-2]
        else:
            meta[rng.choice(["format", meta_key or "x"])] = rng.choice([1, None, ["x"], "text", "{"])
        header["__metadata__"] = meta


def mutate_safetensors(rng: random.Random, raw: bytes, meta_key: str | None) -> bytes:
    (n,) = struct.unpack("<Q", raw[:8])
    op = rng.choice(["truncate", "flip header", "flip data", "edit header", "edit header", "edit header", "length"])
    if op == "truncate":
        return raw[: rng.randrange(len(raw))]
    if op == "length":
        return struct.pack("<Q", rng.choice([n - 1, n + 1, n + 8, len(raw), 2**63, 0])) + raw[8:]
    if op.startswith("flip"):
        lo, hi = (0, 8 + n) if op == "flip header" else (8 + n, len(raw))
        pos = rng.randrange(lo, hi)
        return raw[:pos] + bytes([raw[pos] ^ (1 << rng.randrange(8))]) + raw[pos + 1 :]
    header, data = split(raw)
    mutate_header(rng, header, meta_key)
    out = join(header, data)
    if rng.random() < 0.1:  # the same key twice, which JSON allows and safetensors must not
        first = next((k for k in header if k != "__metadata__"), None)
        if first:
            text = json.dumps(header).encode()[:-1] + b", " + json.dumps({first: header[first]})[1:-1].encode() + b"}"
            out = struct.pack("<Q", len(text)) + text + data
    return out


def mutate_bytes_or_json(rng: random.Random, raw: bytes, edit) -> bytes:
    if rng.random() < 0.25:
        return raw[: rng.randrange(len(raw))] if rng.random() < 0.5 else raw.replace(b"{", b"[", 1)
    return json.dumps(edit(json.loads(raw))).encode()


# ---------------------------------------------------------------- running one case


def run_bounded(fn):
    """``("ok", value)``, ``("error", exc)`` or ``("hang", None)`` for ``fn()`` under TIMEOUT."""
    box: list = []

    def target():
        try:
            box.append(("ok", fn()))
        except BaseException as exc:  # noqa: BLE001 - classified by the caller
            box.append(("error", exc))

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(TIMEOUT)
    return box[0] if box else ("hang", None)


def classify(outcome, describe: str, problems: list[str]) -> object | None:
    kind, value = outcome
    if kind == "hang":
        problems.append(f"{describe}: no answer within {TIMEOUT} s")
    elif kind == "error" and not isinstance(value, AdapterOpsError):
        problems.append(f"{describe}: {type(value).__name__}: {value}")
    elif kind == "ok":
        return value
    return None


# ---------------------------------------------------------------- the independent readings


def peft_oracle(config: dict, module: str, rank: int) -> float:
    """PEFT's own rule (get_pattern_key) and LoraConfig defaults: the alpha our convention must hold."""
    defaults = LoraConfig()

    def pick(field, default):
        patterns = {k: v for k, v in (config.get(field) or {}).items() if k not in CATASTROPHIC}
        return patterns.get(get_pattern_key(patterns.keys(), module), default)

    r = pick("rank_pattern", config.get("r") if config.get("r") is not None else defaults.r)
    assert r == rank, (module, r, rank)
    alpha = float(pick("alpha_pattern", config.get("lora_alpha") if config.get("lora_alpha") is not None else defaults.lora_alpha))
    return alpha / math.sqrt(r) * r if config.get("use_rslora") else alpha


def check_adapter(adapter: Adapter, weights: Path, config: dict | None, fmt: str) -> None:
    tensors = load_file(str(weights))  # safetensors must accept what we accepted
    roles = ("lora_down.weight", "lora_up.weight") if fmt == "kohya" else ("lora_A", "lora_B")
    n_files = len({k.rsplit(roles[0], 1)[0] for k in tensors if roles[0] in k})
    assert len(adapter) == n_files
    for module, layer in adapter.items():
        stem = kohya.flat_name(module) if fmt == "kohya" and not module.startswith("lora_") else module
        for role, t in zip(roles, (layer.A, layer.B)):
            same = [k for k in tensors if f"{stem}.{role}" in k and tensors[k].dtype == t.dtype and torch.equal(tensors[k], t)]
            assert same, (module, role)
        if fmt == "kohya":
            alpha = tensors.get(f"{stem}.alpha")
            expected = float(layer.rank) if alpha is None or float(alpha) == 0 else float(alpha.double())
        else:
            expected = peft_oracle(config, module, layer.rank)
        assert layer.alpha == pytest.approx(expected, rel=1e-12), module


def check_base(ck: Checkpoint, root: Path) -> None:
    """Every tensor as safetensors reads it, in the shard the index names, and nothing else."""
    names = set()
    for shard in ck.files:
        with safe_open(str(shard), framework="pt") as f:  # safetensors must accept every shard we accepted
            for name in f.keys():
                names.add(name)
                assert torch.equal(ck.read(name), f.get_tensor(name)), name
                assert ck.file_of(name) == shard
    assert names == set(ck.names())
    index = json.loads((root / "model.safetensors.index.json").read_text())
    assert {n: root / f for n, f in index["weight_map"].items()} == {n: ck.file_of(n) for n in names}


# ---------------------------------------------------------------- the tests


def cases(count: int, salt: int):
    rng = random.Random(SEED * 1000 + salt)
    return [(i, random.Random(rng.random())) for i in range(count)]


def fuzz(count: int, salt: int, make, load, check) -> None:
    """``make(i, rng)`` writes mutant ``i`` and returns its path; ``load`` reads it; ``check(value, path)``
    compares an accepted mutant with the independent reading."""
    problems: list[str] = []
    loaded = 0
    for i, rng in cases(count, salt):
        target = make(i, rng)
        value = classify(run_bounded(lambda: load(target)), f"mutant {i} ({target.name})", problems)
        if value is not None:
            loaded += 1
            outcome = run_bounded(lambda: check(value, target))
            if outcome[0] != "ok":
                problems.append(f"mutant {i} ({target.name}): accepted, but differs from the independent reading ({outcome[1]!r})")
    assert not problems, "\n".join(problems)
    assert loaded >= 3  # some mutants are harmless (data flips): the comparison ran on them


@pytest.mark.parametrize("fmt", ["native", "kohya"])
def test_single_file_adapters_survive_mutation(originals, tmp_path, fmt):
    source = originals / ("native.st" if fmt == "native" else "kohya.safetensors")
    raw = source.read_bytes()
    meta_key = "adapter_config" if fmt == "native" else kohya.MODULES_KEY

    def make(i, rng):
        path = tmp_path / f"m{i}{source.suffix}"
        path.write_bytes(mutate_safetensors(rng, raw, meta_key))
        return path

    def check(adapter, path):
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        check_adapter(adapter, path, json.loads(header["adapter_config"]) if fmt == "native" else None, fmt)

    fuzz(80, 1 if fmt == "native" else 2, make, ao.load, check)


def test_peft_directories_survive_mutation(originals, tmp_path):
    def make(i, rng):
        d = tmp_path / f"p{i}"
        shutil.copytree(originals / "peft", d)
        if rng.random() < 0.5:
            cfg = d / "adapter_config.json"
            cfg.write_bytes(mutate_bytes_or_json(rng, cfg.read_bytes(), lambda c: mutate_config(rng, c)))
        else:
            w = d / "adapter_model.safetensors"
            w.write_bytes(mutate_safetensors(rng, w.read_bytes(), None))
        return d

    def check(adapter, d):
        check_adapter(adapter, d / "adapter_model.safetensors", json.loads((d / "adapter_config.json").read_text()), "peft")

    fuzz(90, 3, make, ao.load, check)


def mutate_index(rng: random.Random, index: dict) -> object:
    weight_map = index["weight_map"]
    name = rng.choice(sorted(weight_map))
    shards = sorted(set(weight_map.values()))
    op = rng.choice(["drop", "move", "phantom", "escape", "type", "not a map"])
    if op == "drop":
        del weight_map[name]
    elif op == "move":
        weight_map[name] = rng.choice(shards)
    elif op == "phantom":
        weight_map["model.ghost.weight"] = rng.choice(shards)
    elif op == "escape":
        weight_map[name] = rng.choice(["../" + weight_map[name], "/etc/hostname", "./" + weight_map[name], "x.bin", ""])
    elif op == "type":
        weight_map[name] = rng.choice([1, None, ["a"]])
    else:
        index["weight_map"] = rng.choice([[1], "x", None, {}])
    return index


def test_base_checkpoints_survive_mutation(originals, tmp_path):
    def make(i, rng):
        d = tmp_path / f"b{i}"
        shutil.copytree(originals / "base", d)
        if rng.random() < 0.3:
            index = d / "model.safetensors.index.json"
            index.write_bytes(mutate_bytes_or_json(rng, index.read_bytes(), lambda x: mutate_index(rng, x)))
        else:
            shard = rng.choice(sorted(d.glob("*.safetensors")))
            shard.write_bytes(mutate_safetensors(rng, shard.read_bytes(), None))
        return d

    fuzz(90, 4, make, Checkpoint, check_base)


# ---------------------------------------------------------------- GGUF


def mutate_gguf(rng: random.Random, raw: bytes) -> bytes:
    op = rng.choice(["truncate", "flip", "flip", "count", "nest", "alignment"])
    if op == "truncate":
        return raw[: rng.randrange(len(raw))]
    if op == "flip":
        pos = rng.randrange(min(len(raw), 2048))  # the directory and the first data
        return raw[:pos] + bytes([raw[pos] ^ (1 << rng.randrange(8))]) + raw[pos + 1 :]
    if op == "count":  # the tensor count or the key-value count: what a crafted file lies about
        pos = rng.choice([8, 16])
        return raw[:pos] + struct.pack("<Q", rng.choice([0, 1, 2**31, 2**63, 2**64 - 1])) + raw[pos + 8 :]
    (n_tensors,) = struct.unpack("<Q", raw[8:16])
    key = b"general.alignment" if op == "alignment" else b"x"
    if op == "nest":  # an array of arrays of arrays ... of one u32: deeper than any real file
        value = struct.pack("<I", 9) + (struct.pack("<I", 9) + struct.pack("<Q", 1)) * rng.choice([3, 20, 5000]) + struct.pack("<I", 4) + struct.pack("<Q", 1) + b"\0\0\0\0"
    else:
        value = rng.choice([struct.pack("<I", 8) + struct.pack("<Q", 3) + b"abc", struct.pack("<I", 4) + struct.pack("<I", 3),
                            struct.pack("<I", 9) + struct.pack("<I", 4) + struct.pack("<Q", 1) + struct.pack("<I", 32),
                            struct.pack("<I", 6) + struct.pack("<f", 32.0), struct.pack("<I", 7) + b"\1"])
    (n_kv,) = struct.unpack("<Q", raw[16:24])
    entry = struct.pack("<Q", len(key)) + key + value
    return raw[:8] + struct.pack("<Q", n_tensors) + struct.pack("<Q", n_kv + 1) + entry + raw[24:]  # a first key-value pair


def test_gguf_adapters_survive_mutation(originals, tmp_path):
    """Each mutant of a GGUF adapter is refused with an AdapterOpsError or, where accepted, is a file
    the gguf package (llama.cpp's own reader) reads too, with the same tensor names and shapes."""
    gguf = pytest.importorskip("gguf")
    base = tmp_path / "hf-base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8,
                                                  "intermediate_size": 6, "num_attention_heads": 2, "num_key_value_heads": 2,
                                                  "num_hidden_layers": 2}))
    g = torch.Generator().manual_seed(0)
    shapes = {MODULES[0]: (8, 8), MODULES[1]: (8, 8), MODULES[2]: (8, 6)}
    Adapter({m: LoraLayer(torch.randn(2, i, generator=g), torch.randn(o, 2, generator=g), 4.0) for m, (o, i) in shapes.items()}).save(
        tmp_path / "a.gguf", format="gguf", base=base)
    raw = (tmp_path / "a.gguf").read_bytes()

    def make(i, rng):
        path = tmp_path / f"g{i}.gguf"
        path.write_bytes(mutate_gguf(rng, raw))
        return path

    def check(adapter, path):
        reader = gguf.GGUFReader(str(path))
        theirs = sorted(tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors)
        ours = sorted(tuple(t.shape) for layer in adapter.values() for t in (layer.A, layer.B))
        assert ours == theirs, (ours, theirs)

    fuzz(80, 5, make, lambda p: ao.load(p, base=base), check)


def test_an_unpaired_surrogate_escape_is_refused_like_safetensors_and_printed_safely(originals, tmp_path):
    header, data = split((originals / "native.st").read_bytes())
    bad = tmp_path / "surrogate.st"
    bad.write_bytes(join({**header, "\ud800": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}, data))
    with pytest.raises(Exception):  # the oracle: the safetensors library refuses the header
        safe_open(bad, "pt")
    with pytest.raises(AdapterOpsError, match="unpaired UTF-16 surrogate"):
        ao.load(bad)
    from click.testing import CliRunner
    from adapterops.cli import main

    meta = dict(header["__metadata__"])
    key = "adapterops_metadata"
    stored = json.loads(meta[key])
    named = tmp_path / "named.st"  # a lone surrogate inside the adapter's own JSON metadata: loads, and prints
    named.write_bytes(join({**header, "__metadata__": {**meta, key: json.dumps({**stored, "base_model": "\ud800"})}}, data))
    result = CliRunner().invoke(main, ["info", str(named)])
    assert result.exit_code == 0 and result.exception is None, result.output
    assert "\\ud800" in result.output
