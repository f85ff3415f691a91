"""Shared pieces of the benchmark scripts: synthetic Llama checkpoints, subprocess-per-route timing, tables.

The merge benchmarks (``bench_merge.py``, ``bench_nf4_merge.py``) time each route as a whole
process, the way a user runs it: ``cp -r`` and the ``adapterops`` command line as they are, the
other routes as the script re-run with ``--child ROUTE``. The clock starts before the process does
and stops after it exited and (unless ``--no-sync``) ``os.sync()`` wrote its output back, so
start-up (interpreter, imports, CUDA) counts; ``--cold`` drops the page cache first (``--cold-inputs``
drops it and reloads the libraries, untimed). A child also
reports its time after imports (``work_seconds``). Peak RSS is the process's ``ru_maxrss``. Scripts import this module by name
(``from _harness import ...``): Python puts the script's own folder first on ``sys.path``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "INDEX",
    "ShardRotation",
    "add_merge_arguments",
    "all_linear_adapter",
    "cli",
    "drop_page_cache",
    "describe_device",
    "is_linear",
    "llama_config",
    "llama_tensors",
    "parse_with_threads",
    "print_table",
    "remove_outputs",
    "resolve_dims",
    "time_child",
    "time_command",
    "time_routes",
]

INDEX = "model.safetensors.index.json"


# --- building the inputs -----------------------------------------------------------------------


def llama_tensors(layers: int, hidden: int, intermediate: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a Llama-2 checkpoint, in the order transformers saves them."""
    names = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        names += [
            (f"{p}.input_layernorm.weight", (hidden,)),
            (f"{p}.mlp.down_proj.weight", (hidden, intermediate)),
            (f"{p}.mlp.gate_proj.weight", (intermediate, hidden)),
            (f"{p}.mlp.up_proj.weight", (intermediate, hidden)),
            (f"{p}.post_attention_layernorm.weight", (hidden,)),
            (f"{p}.self_attn.k_proj.weight", (hidden, hidden)),
            (f"{p}.self_attn.o_proj.weight", (hidden, hidden)),
            (f"{p}.self_attn.q_proj.weight", (hidden, hidden)),
            (f"{p}.self_attn.v_proj.weight", (hidden, hidden)),
        ]
    return names + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def is_linear(name: str, shape: tuple[int, ...]) -> bool:
    """A decoder linear layer (attention or MLP projection): what an all-linear LoRA adapts."""
    return len(shape) == 2 and (".mlp." in name or ".self_attn." in name)


def llama_config(dims: dict, **extra: Any) -> dict:
    """config.json of the synthetic bf16 Llama checkpoint of size ``dims``, plus ``extra`` keys."""
    heads = max(1, dims["hidden"] // 128)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": dims["hidden"],
        "intermediate_size": dims["intermediate"], "num_hidden_layers": dims["layers"],
        "num_attention_heads": heads, "num_key_value_heads": heads,
        "vocab_size": dims["vocab"], "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "tie_word_embeddings": False, "dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2, **extra,
    }


def all_linear_adapter(dims: dict, *, rank: int, alpha: float):
    """A LoRA of ``rank`` on every linear layer of ``llama_tensors(**dims)``: fp32 factors, non-zero B.

    ``A ~ N(0, 1/in)``, ``B ~ N(0, 0.01^2)`` (seed 1), so ``||dW|| / ||W||`` is about 0.1 on the synthetic bases.
    """
    import torch

    from adapterops import Adapter, LoraLayer

    g = torch.Generator().manual_seed(1)
    layers = {}
    for name, shape in llama_tensors(**dims):
        if is_linear(name, shape):
            out, inp = shape
            A = torch.randn(rank, inp, generator=g) / inp**0.5  # (r, in)
            B = torch.randn(out, rank, generator=g) * 0.01  # (out, r)
            layers[name.removesuffix(".weight")] = LoraLayer(A, B, float(alpha))
    return Adapter(layers)


class ShardRotation:
    """Writes tensors in order into ``count`` shards of about ``total / count`` (dense) bytes each.

    Call :meth:`begin` with a tensor's dense size before adding its entries; it opens the next
    shard once the bytes begun so far reach that shard's share.
    """

    def __init__(self, path: Path, total: float, count: int = 3) -> None:
        self.path, self.target, self.count = path, total / count, count
        self.index, self.done, self.writer = 0, 0.0, None
        self.weight_map: dict[str, str] = {}

    def begin(self, size: float) -> None:
        from adapterops.checkpoint import ShardWriter

        if self.writer is None or (self.done >= self.target * self.index and self.index < self.count):
            if self.writer is not None:
                self.writer.close()
            self.index += 1
            name = f"model-{self.index:05d}-of-{self.count:05d}.safetensors"
            self.writer = ShardWriter(self.path / name, metadata={"format": "pt"})
        self.done += size

    def add(self, key: str, tensor: Any) -> None:
        self.writer.add(key, tensor)
        self.weight_map[key] = self.writer.path.name

    def close(self) -> dict[str, str]:
        """Close the last shard; returns the weight map (key -> shard file name)."""
        self.writer.close()
        return self.weight_map


# --- the child: time one route -----------------------------------------------------------------


def time_child(
    fn: Callable[[Path, Path, Path, str], dict | None],
    route: str,
    base: Path,
    adapter: Path,
    out: Path,
    device: str,
    *,
    sync: bool,
    threads: int | None,
    preload: Iterable[str] = (),
) -> None:
    """Run ``fn(base, adapter, out, device)`` timed and print ``{"seconds", "peak_rss", **fn's dict}``.

    Imports (torch and ``preload``) happen before the clock starts; ``copy`` imports nothing.
    """
    if route != "copy":
        import torch

        if threads:
            torch.set_num_threads(threads)
        for module in preload:
            importlib.import_module(module)
    start = time.perf_counter()
    extra = fn(base, adapter, out, device) or {}
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    if sync:
        os.sync()
    seconds = time.perf_counter() - start
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "peak_rss": kids if route == "copy" else own, **extra}))


# --- the parent: run each route in its own process ---------------------------------------------


def cli(*args: object) -> list[str]:
    """The ``adapterops`` command as a user runs it: the one on PATH, else the one beside this interpreter."""
    exe = shutil.which("adapterops") or str(Path(sys.executable).with_name("adapterops"))
    return [exe, *map(str, args)]


def drop_page_cache() -> bool:
    """Write back dirty pages and drop the page cache (root on Linux); False where that is not allowed."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _route_command(script: str, route: str, base: Path, adapter: Path, out: Path, device: str, sync: bool, threads: int | None) -> list[str]:
    cmd = [sys.executable, script, "--child", route, "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--device", device]
    return cmd + ([] if sync else ["--no-sync"]) + ([f"--threads={threads}"] if threads else [])


WARM_LIBRARIES = [sys.executable, "-c", "import torch, adapterops.cli; torch.cuda.is_available() and torch.cuda.init()"]
FLOOR_ROUTES = ("startup", "write")


def floor_commands(nbytes: int) -> dict[str, Callable[[Path], list[str]]]:
    """What no merge command can avoid, as routes of their own: ``startup`` (the interpreter, torch,
    adapterops' CLI and CUDA starting, nothing else) and ``write`` (``nbytes`` written to a new file,
    and written back to the disk with the other routes' ``os.sync()``). A merge that reads the base
    while it starts cannot finish before startup + write."""
    return {
        "startup": lambda out: WARM_LIBRARIES,
        "write": lambda out: ["dd", "if=/dev/zero", f"of={out}", "bs=64M", f"count={nbytes}", "iflag=count_bytes", "status=none"],
    }


def time_command(command: list[str], *, sync: bool = True, cold: bool = False, threads: int | None = None) -> dict:
    """Run ``command`` as a whole process, timed from outside (start-up, work and, with ``sync``, the
    write-back of its output all count); with ``cold`` the page cache is dropped first.

    Returns ``returncode``, ``seconds``, ``peak_rss`` (``ru_maxrss`` of this process's children: the
    command's own only when nothing larger ran before it, hence ``_run_route``'s fresh timer
    interpreter), ``page_cache_dropped``, ``stdout`` and ``stderr``.
    """
    os.sync()
    dropped = drop_page_cache() if cold else False
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    start = time.perf_counter()
    child = subprocess.run(command, capture_output=True, text=True, env=env)
    if sync:
        os.sync()
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"returncode": child.returncode, "seconds": seconds, "peak_rss": rss, "page_cache_dropped": dropped,
            "stdout": child.stdout, "stderr": child.stderr}


def _run_route(command: list[str], route: str, sync: bool, cold: str | None, threads: int | None) -> dict:
    """One timed run; a ``--child`` route's own time after imports is kept as ``work_seconds``.

    ``cold``: ``"all"`` drops the page cache first; ``"inputs"`` drops it, then loads torch and
    adapterops once, untimed, so that only the data comes from the disk (as on a machine where the
    libraries were used lately)."""
    dropped = None
    if cold == "inputs":
        dropped = drop_page_cache()
        subprocess.run(WARM_LIBRARIES, capture_output=True, check=False)  # from here, not the timer: its RSS stays the route's
    spec = json.dumps({"command": command, "sync": sync, "cold": cold == "all", "threads": threads})
    done = subprocess.run([sys.executable, __file__, "--timer", spec], capture_output=True, text=True, check=True)
    run = json.loads(done.stdout)
    if dropped is not None:
        run.update(page_cache_dropped=dropped, libraries_warm=True)
    if run.pop("returncode") != 0:
        lines = run["stderr"].strip().splitlines()
        return {"route": route, "error": lines[-1] if lines else "failed"}
    result = {"route": route, **{k: v for k, v in run.items() if k != "stderr"}}
    last = run["stdout"].strip().splitlines()[-1] if run["stdout"].strip() else ""
    if last.startswith("{") and '"seconds"' in last:
        inner = json.loads(last)
        result["work_seconds"] = inner.pop("seconds")
        inner.pop("peak_rss", None)
        result.update(inner)
    return result


def time_routes(
    script: str,
    routes: list[str],
    *,
    work: Path,
    base: Path,
    adapter: Path,
    device: str,
    sync: bool,
    threads: int | None,
    repeat: int,
    commands: dict[str, Callable[[Path], list[str]]] | None = None,
    cold: str | None = None,
    annotate: Callable[[Path, dict], dict] | None = None,
) -> tuple[list[dict], dict[str, Path]]:
    """Run each route ``repeat`` times (output in ``work/out-ROUTE``); keep the fastest run.

    ``commands[route](out)`` gives the command line of a route that is a plain command; the others
    run as this script's children. ``annotate(out, result)`` adds keys to each successful run (it
    sees the route's stdout as ``result["stdout"]``). Each run is timed by a fresh small interpreter,
    so its peak RSS is the route's alone. Returns the results and the output folder of each route;
    a route with any failed run reports its first failure.
    """
    results, outputs = [], {}
    for route in routes:
        out = work / f"out-{route}"
        runs = []
        for _ in range(max(1, repeat)):
            if out.is_dir():
                shutil.rmtree(out, ignore_errors=True)
            out.unlink(missing_ok=True)
            if commands and route in commands:
                command = commands[route](out)
            else:
                command = _route_command(script, route, base, adapter, out, device, sync, threads)
            result = _run_route(command, route, sync, cold, threads)
            if annotate is not None and "seconds" in result:
                result.update(annotate(out, result))
            result.pop("stdout", None)
            runs.append(result)
        ok = [r for r in runs if "seconds" in r]
        best = min(ok, key=lambda r: r["seconds"]) if len(ok) == len(runs) else next(r for r in runs if "seconds" not in r)
        if "seconds" in best:
            best = {**best, "peak_rss": max(r["peak_rss"] for r in ok), "runs": [r["seconds"] for r in ok]}
        results.append(best)
        outputs[route] = out
        print(f"  {route}: " + (f"{best['seconds']:.1f} s" if "seconds" in best else f"failed: {best['error']}"), flush=True)
    return results, outputs


def remove_outputs(outputs: dict[str, Path], work: Path, *, keep: bool, own_work: bool) -> None:
    """Delete the route outputs (and ``work`` itself when this run created it) unless ``keep``."""
    if keep:
        return
    for out in outputs.values():
        if out.is_dir():
            shutil.rmtree(out, ignore_errors=True)
        else:
            out.unlink(missing_ok=True)
    if own_work:
        shutil.rmtree(work, ignore_errors=True)


def print_table(results: list[dict], header: str, cells: Callable[[dict], str]) -> None:
    """Route, seconds, ratio to ``copy``, peak RSS, then the script's own ``header`` / ``cells(result)``."""
    copy = next((r["seconds"] for r in results if r["route"] == "copy" and "seconds" in r), None)
    print()
    print(f"{'route':<11} {'seconds':>8} {'x copy':>7} {'peak RSS':>9} {header}")
    for r in results:
        if "seconds" not in r:
            print(f"{r['route']:<11} failed: {r['error']}")
            continue
        ratio = f"{r['seconds'] / copy:.2f}" if copy else "-"
        print(f"{r['route']:<11} {r['seconds']:>8.1f} {ratio:>7} {r['peak_rss'] / 1e9:>7.2f}GB {cells(r)}")


# --- options and devices -----------------------------------------------------------------------


def add_merge_arguments(parser: argparse.ArgumentParser, *, routes: Iterable[str], sizes: dict[str, dict]) -> None:
    """The options every merge benchmark takes, and the hidden ones of its ``--child`` runs."""
    routes = list(routes)
    p = parser
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    p.add_argument("--size", choices=sorted(sizes), default=None, help="7b (default on cuda) or small (default on cpu)")
    p.add_argument("--layers", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--intermediate", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--routes", default=",".join(routes), help=f"comma-separated subset of {','.join(routes)}")
    p.add_argument("--workdir", type=Path, default=None, help="where the checkpoint and outputs go (default: a new temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the workdir contents afterwards")
    p.add_argument("--no-sync", dest="sync", action="store_false", help="do not include os.sync() of the output in the times")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads in every route (default: torch's choice)")
    p.add_argument("--repeat", type=int, default=1, help="run each route this many times; report the fastest (and the largest RSS)")
    p.add_argument("--cold", action="store_const", const="all", default=None,
                   help="drop the page cache before each run (needs root): inputs and libraries come from the disk")
    p.add_argument("--cold-inputs", dest="cold", action="store_const", const="inputs",
                   help="drop the page cache, then load torch and adapterops once (untimed): only the inputs come from the disk")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--adapter", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)


def resolve_dims(args: argparse.Namespace, sizes: dict[str, dict]) -> tuple[str, dict]:
    """The device (cuda if present) and the model dims: ``--size`` (7b on cuda, small on cpu) then overrides."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dims = dict(sizes[args.size or ("7b" if device.startswith("cuda") else "small")])
    dims.update({k: getattr(args, k) for k in dims if getattr(args, k) is not None})
    return device, dims


def describe_device(device: str) -> str:
    """How every benchmark labels the device it ran on: the GPU's name, or the CPU's cores."""
    if device.startswith("cuda"):
        import torch

        return f"{torch.cuda.get_device_name(torch.device(device))} (CUDA)"
    return f"CPU ({os.cpu_count()} cores, {platform.machine()})"


def parse_with_threads(parser: argparse.ArgumentParser) -> tuple[argparse.Namespace, Any]:
    """Add ``--threads`` and ``--json``, parse, apply the thread count; returns the args and ``torch.device(args.device)``."""
    import torch

    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args, torch.device(args.device)


if __name__ == "__main__" and sys.argv[1:2] == ["--timer"]:
    spec = json.loads(sys.argv[2])
    print(json.dumps(time_command(spec["command"], sync=spec["sync"], cold=spec["cold"], threads=spec["threads"])))
