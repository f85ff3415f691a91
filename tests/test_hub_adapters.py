"""Adapters named by Hub repo id: resolved from a Hugging Face cache laid out on disk, offline.

The cache follows huggingface_hub's layout (``models--user--repo/refs/<name>`` holding a commit
hash, ``snapshots/<hash>/<files>``), so the real resolver (``checkpoint.resolve_base``) finds it.
"""

import json

from huggingface_hub import constants as hub_constants
import pytest
import torch
from click.testing import CliRunner

import adapterops as ao
from adapterops import Adapter, LoraLayer
from adapterops.checkpoint import Checkpoint
from adapterops.cli import main
from adapterops.errors import FormatError

Q = "model.layers.0.self_attn.q_proj"
MAIN, V1 = "a" * 40, "b" * 40


def adapter(seed: int, rank: int) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    return Adapter({Q: LoraLayer(torch.randn(rank, 8, generator=g), torch.randn(6, rank, generator=g), float(rank))},
                   {"base_model": "org/base", "task_type": "CAUSAL_LM"})


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A cache with ``user/lora`` (PEFT directory; main and tag v1) and ``user/single`` (one native file)."""
    cache = tmp_path / "hub"
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = cache / "models--user--lora"
    for ref, commit, seed in [("main", MAIN, 1), ("v1", V1, 2)]:
        adapter(seed, 2 + seed).save(repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    single = cache / "models--user--single"
    (single / "snapshots" / MAIN).mkdir(parents=True)
    adapter(3, 4).save(single / "snapshots" / MAIN / "adapter.st")
    (single / "refs").mkdir()
    (single / "refs" / "main").write_text(MAIN)
    return cache


def test_load_by_repo_id_and_revision(hub):
    assert ao.load("user/lora").ranks == {Q: 3}
    assert ao.load("user/lora", revision="v1").ranks == {Q: 4}
    assert ao.load("user/lora@v1").ranks == {Q: 4}
    assert ao.load("user/lora", revision=V1).ranks == {Q: 4}  # a commit hash
    torch.testing.assert_close(ao.load("user/lora@v1").delta(Q), adapter(2, 4).delta(Q))
    single = ao.load("user/single")
    assert single.ranks == {Q: 4} and single.metadata["format"] == "native" and single.metadata["source"] == "user/single"


def test_missing_repo_fails_as_a_missing_base_does(hub):
    with pytest.raises(FormatError) as for_base:
        Checkpoint("user/nothing")
    with pytest.raises(FormatError) as for_adapter:
        ao.load("user/nothing")
    assert str(for_adapter.value) == str(for_base.value)
    assert "not in the Hugging Face cache (offline mode is on)" in str(for_adapter.value)
    with pytest.raises(FormatError, match="not in the Hugging Face cache"):
        ao.load("user/lora", revision="v9")


def test_revision_of_a_local_path_is_refused(tmp_path, hub):
    adapter(1, 2).save(tmp_path / "local")
    with pytest.raises(FormatError, match="is a local path; a revision \\(v1\\) applies only to Hub repo ids"):
        ao.load(tmp_path / "local", revision="v1")


def test_every_cli_argument_that_takes_an_adapter_takes_a_repo_id(hub, tmp_path):
    runner = CliRunner()
    info = runner.invoke(main, ["info", "user/lora@v1", "--json"])
    assert info.exit_code == 0, info.output
    assert json.loads(info.stdout)["rank"] == 4
    out = tmp_path / "blend.st"
    blend = runner.invoke(main, ["blend", "user/lora", "user/lora@v1", "--weights", "1,1", "-o", str(out)])
    assert blend.exit_code == 0, blend.output
    torch.testing.assert_close(ao.load(out).delta(Q), adapter(1, 3).delta(Q) + adapter(2, 4).delta(Q))
    check = runner.invoke(main, ["check", "user/lora", "--target", "transformers"])
    assert check.exit_code == 0 and check.stdout.startswith("ok: transformers loads user/lora")
    missing = runner.invoke(main, ["info", "user/nothing"])
    assert missing.exit_code == 1
    assert missing.stderr.startswith("Error: user/nothing: not a local path, and not in the Hugging Face cache (offline mode is on)")
