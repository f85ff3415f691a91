"""Consumer rules (adapterops.targets), `check --target` and `convert --target`, on a tiny Llama-shaped base.

Exactness of `convert --target vllm` is checked against dense float64 references: the best rank-k
truncation of each delta (Eckart-Young) and the DoRA-merged weight written out independently.
"""

import json
import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import adapterops as ao
from adapterops import Adapter, LoraLayer
from adapterops.cli import main
from adapterops.errors import AdapterOpsError, UnsupportedOperationError
from adapterops.targets import canonical_base, check, complete_metadata, prepare, task_type_of

Q, UP, EXTRA = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.extra_proj"
SHAPES = {Q: (16, 12), UP: (20, 12), EXTRA: (12, 12)}  # (out, in)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A Llama-architecture checkpoint directory with three linear weights (one that vLLM does not adapt)."""
    root = tmp_path_factory.mktemp("base")
    g = torch.Generator().manual_seed(0)
    save_file({f"{n}.weight": torch.randn(*s, generator=g, dtype=torch.float64).float() for n, s in SHAPES.items()}, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    return root


def layer(name, rank, alpha, seed, dora=False):
    g = torch.Generator().manual_seed(seed)
    out, inp = SHAPES[name]
    mag = (torch.rand(out, generator=g, dtype=torch.float64) + 0.5) if dora else None
    return LoraLayer(torch.randn(rank, inp, generator=g, dtype=torch.float64), torch.randn(out, rank, generator=g, dtype=torch.float64), alpha, mag)


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def dense(adapter, name):
    return adapter[name].delta(torch.float64)


# ---------------------------------------------------------------- check


def test_check_ok_prints_one_line_and_exits_0(tmp_path, base):
    Adapter({Q: layer(Q, 8, 16, 1), UP: layer(UP, 4, 4, 2)}, {"base_model": str(base)}).save(tmp_path / "a")
    result = run("check", tmp_path / "a", "--target", "vllm", "--base", base)
    assert result.exit_code == 0
    assert result.stdout == f"ok: vllm loads {tmp_path / 'a'} as it is\n"


def test_check_vllm_lists_every_reason_one_line_each(tmp_path, base):
    blend = Adapter({Q: layer(Q, 32, 32, 1), UP: layer(UP, 24, 24, 2), EXTRA: layer(EXTRA, 4, 4, 3)}, {"base_model": str(base)})
    blend.save(tmp_path / "a")
    result = run("check", tmp_path / "a", "--target", "vllm", "--base", base)
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        f"vllm: rank 32 is greater than max_lora_rank 16 (2 layers, e.g. {Q}) [fix: re-compressed optimally to at most rank 16]",
        "vllm: LlamaForCausalLM adapts only down_proj, embed_tokens, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj "
        f"(1 layer, e.g. {EXTRA} target other modules)",
    ]
    data = json.loads(run("check", tmp_path / "a", "--target", "vllm", "--max-lora-rank", "32", "--json").stdout)
    assert data["ok"] is False and data["target"] == "vllm"
    assert [p["rule"] for p in data["problems"]] == ["modules"]  # rank 32 fits; the architecture comes from base_model


def test_check_vllm_reads_the_config_vllm_reads(tmp_path):
    """modules_to_save, bias, DoRA and a native file: what vLLM's PEFTHelper refuses."""
    d = tmp_path / "peft"
    Adapter({Q: layer(Q, 4, 8, 1, dora=True)}).save(d)
    config = json.loads((d / "adapter_config.json").read_text())
    config.update(modules_to_save=["lm_head"], bias="all")
    (d / "adapter_config.json").write_text(json.dumps(config))
    result = run("check", d, "--target", "vllm", "--json")
    assert result.exit_code == 1
    rules = [p["rule"] for p in json.loads(result.stdout)["problems"]]
    assert rules == ["modules_to_save", "bias", "dora"]
    lines = run("check", d, "--target", "vllm").stdout.splitlines()
    assert lines[0] == "vllm: modules_to_save ['lm_head'] is not supported (only a classifier/score head is)"
    assert lines[1] == "vllm: adapter bias is not supported (bias='all')"
    assert lines[2] == f"vllm: DoRA is not supported (1 layer, e.g. {Q}) [fix: turned into a plain LoRA of the same merged effect (needs --base)]"
    assert lines[3] == "note: architecture unknown (pass --base): target modules not checked"

    Adapter({Q: layer(Q, 4, 8, 1)}).save(tmp_path / "x.st")
    lines = run("check", tmp_path / "x.st", "--target", "peft").stdout.splitlines()
    assert lines[0] == ("peft: loads a PEFT directory (adapter_config.json + adapter_model.safetensors); this is a native file "
                        "[fix: written as a PEFT directory]")


def test_check_rejects_a_max_lora_rank_vllm_does_not_accept(tmp_path):
    Adapter({Q: layer(Q, 4, 8, 1)}).save(tmp_path / "a")
    result = run("check", tmp_path / "a", "--target", "vllm", "--max-lora-rank", "20")
    assert result.exit_code == 2 and "'20' is not one of '1', '8', '16', '32', '64', '128', '256', '320', '512'" in result.stderr
    with pytest.raises(AdapterOpsError, match="max_lora_rank 20 is not a value vLLM accepts"):
        check(tmp_path / "a", "vllm", max_lora_rank=20)


def test_check_llama_cpp_finds_the_scales_one_alpha_gets_wrong(tmp_path, base):
    blend = Adapter({Q: layer(Q, 8, 8, 1), UP: layer(UP, 4, 4, 2)}, {"base_model": str(base)})  # alpha = rank: a blend's layers
    blend.save(tmp_path / "blend")
    result = run("check", tmp_path / "blend", "--target", "llama.cpp")
    assert result.exit_code == 1
    assert result.stdout.splitlines()[0] == (
        f"llama.cpp: one alpha per file (8, over each tensor's rank) mis-scales 1 layer, e.g. {UP} through convert_lora_to_gguf.py "
        "(llama.cpp would apply 2 where the adapter means 1) "
        "[fix: exported with `adapterops convert --to gguf --base B`, which folds every scale exactly]"
    )
    assert [p.rule for p in check(tmp_path / "blend", "llama.cpp").problems] == ["alpha"]
    # one alpha over equal ranks is what llama.cpp applies
    Adapter({Q: layer(Q, 8, 16, 1), UP: layer(UP, 8, 16, 2)}, {"base_model": str(base)}).save(tmp_path / "uniform")
    assert check(tmp_path / "uniform", "llama.cpp").ok


def test_check_llama_cpp_alpha_message_names_the_wrong_scale(tmp_path):
    Adapter({Q: layer(Q, 8, 16, 1), UP: layer(UP, 4, 2, 2), EXTRA: layer(EXTRA, 8, 16, 3)}).save(tmp_path / "a")
    (p,) = check(tmp_path / "a", "llama.cpp").problems
    assert p.message == (f"one alpha per file (16, over each tensor's rank) mis-scales 1 layer, e.g. {UP} through "
                         "convert_lora_to_gguf.py (llama.cpp would apply 4 where the adapter means 0.5)")


def test_check_peft_needs_task_type_and_a_findable_base(tmp_path, monkeypatch):
    d = tmp_path / "peft"
    Adapter({Q: layer(Q, 4, 8, 1)}).save(d)
    result = run("check", d, "--target", "peft")
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        "peft: task_type is not set, so AutoPeftModelForCausalLM refuses it [fix: set from the base's architecture (--base), or --task-type]",
        "peft: base_model_name_or_path is not set, so AutoPeftModel cannot find the base [fix: set from --base]",
    ]
    config = json.loads((d / "adapter_config.json").read_text())
    (tmp_path / "rel").mkdir()
    config.update(task_type="CAUSAL_LM", base_model_name_or_path="rel")
    (d / "adapter_config.json").write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)
    (p,) = check(d, "peft").problems
    assert p.message == "base_model_name_or_path 'rel' is a relative path, which resolves only from this directory"
    assert check(d, "transformers").ok  # load_adapter needs neither
    config.update(base_model_name_or_path=3)
    (d / "adapter_config.json").write_text(json.dumps(config))
    (p,) = check(d, "peft").problems
    assert p.message == "base_model_name_or_path is int 3, not a Hub id or path"
    assert "base_model" not in ao.load(d).metadata


def test_check_with_base_finds_modules_and_shapes_that_do_not_fit(tmp_path, base):
    wrong = Adapter({"model.layers.0.self_attn.q_proj": LoraLayer(torch.randn(2, 7), torch.randn(16, 2), 2.0)})
    report = check(wrong, "peft", base=base)
    assert [p.rule for p in report.problems] == ["base"]
    assert "model.layers.0.self_attn.q_proj" in report.problems[0].message


# ---------------------------------------------------------------- convert --target vllm


def best_rank_k(delta: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]


def test_convert_target_vllm_recompresses_optimally_and_folds_scales(tmp_path, base):
    source = Adapter({Q: layer(Q, 12, 3, 1), UP: layer(UP, 4, 10, 2)}, {"base_model": str(base)})  # rank 12 > 8
    source.save(tmp_path / "in.st")
    result = run("convert", tmp_path / "in.st", "--to", "peft", "--target", "vllm", "--max-lora-rank", "8", "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    out = ao.load(tmp_path / "out")
    assert out.ranks == {Q: 8, UP: 4}
    assert all(l.alpha == l.rank for l in out.values())  # scale 1 everywhere: lora_alpha == r, patterns agree
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] and config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == str(base)
    want = best_rank_k(dense(source, Q), 8)
    torch.testing.assert_close(dense(out, Q), want, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(dense(out, UP), dense(source, UP), atol=1e-12, rtol=1e-12)  # untouched but folded: exact
    kept = float((want**2).sum() / (dense(source, Q) ** 2).sum())
    assert data["layers"] == {Q: {"change": "rank", "rank_before": 12, "rank": 8, "energy_kept": pytest.approx(kept, rel=1e-9)}}
    assert data["energy_kept_min"] == pytest.approx(kept, rel=1e-9)
    assert check(tmp_path / "out", "vllm", max_lora_rank=8, base=base).ok
    human = run("convert", tmp_path / "in.st", "--to", "peft", "--target", "vllm", "--max-lora-rank", "8", "-o", tmp_path / "out2")
    lines = human.stdout.splitlines()
    assert lines[1].startswith("fixed format: loads a PEFT directory")
    assert lines[2] == f"fixed rank: rank 12 is greater than max_lora_rank 8 (1 layer, e.g. {Q}) -> re-compressed optimally to at most rank 8"
    assert lines[3] == f"changed 1 of 2 layers; least energy kept {kept:.4f}"
    assert lines[4] == f"  {Q}: rank, rank 12 -> 8, energy kept {kept:.4f}"


def dora_merged(W: torch.Tensor, l: LoraLayer) -> torch.Tensor:
    """Liu et al. 2024, eq. 5 (PEFT's convention): m * (W + s B A) / ||W + s B A||_row."""
    V = W + (l.alpha / l.rank) * l.B @ l.A
    return l.magnitude[:, None] * V / V.norm(dim=1, keepdim=True)


def test_convert_target_vllm_turns_dora_into_the_same_merged_effect(tmp_path, base):
    from adapterops.checkpoint import Checkpoint

    source = Adapter({Q: layer(Q, 4, 8, 1, dora=True), UP: layer(UP, 2, 2, 2, dora=True)}, {"base_model": str(base)})
    source.save(tmp_path / "dora")
    refused = run("convert", tmp_path / "dora", "--to", "peft", "--target", "vllm", "-o", tmp_path / "x")
    assert refused.exit_code == 1 and not (tmp_path / "x").exists()
    assert refused.stderr == (f"Error: {tmp_path / 'dora'} cannot be made to load in vllm: DoRA is not supported "
                              f"(2 layers, e.g. {UP}) (pass --base to convert it)\n")
    out, report = prepare(tmp_path / "dora", "vllm", base=base)  # rank cap 16 >= 12 = full rank of a 16 x 12 delta
    W = Checkpoint(base).read(f"{Q}.weight").double()
    torch.testing.assert_close(dense(out, Q), dora_merged(W, source[Q]) - W, atol=1e-9, rtol=1e-9)
    assert not out.is_dora and report["layers"][Q]["change"] == "dora" and report["layers"][Q]["energy_kept"] == pytest.approx(1.0)
    out8, report8 = prepare(tmp_path / "dora", "vllm", base=base, max_lora_rank=8)
    torch.testing.assert_close(dense(out8, Q), best_rank_k(dora_merged(W, source[Q]) - W, 8), atol=1e-9, rtol=1e-9)
    assert report8["layers"][Q]["energy_kept"] < 1.0


def test_convert_target_refuses_what_it_cannot_fix(tmp_path, base):
    Adapter({EXTRA: layer(EXTRA, 4, 4, 3)}, {"base_model": str(base)}).save(tmp_path / "a")
    result = run("convert", tmp_path / "a", "--to", "peft", "--target", "vllm", "-o", tmp_path / "out")
    assert result.exit_code == 1 and not (tmp_path / "out").exists()
    assert result.stderr.startswith(f"Error: {tmp_path / 'a'} cannot be made to load in vllm: LlamaForCausalLM adapts only")
    with pytest.raises(UnsupportedOperationError, match="task_type is not set"):
        prepare(Adapter({Q: layer(Q, 4, 4, 1)}), "peft")
    result = run("convert", tmp_path / "a", "--to", "kohya", "--target", "vllm", "-o", tmp_path / "k.safetensors")
    assert result.exit_code == 2 and "--target vllm writes a PEFT directory; use --to peft" in result.stderr


# ---------------------------------------------------------------- metadata loaders need, across formats


def test_task_type_of_architectures():
    assert task_type_of({"architectures": ["LlamaForCausalLM"]}) == "CAUSAL_LM"
    assert task_type_of({"architectures": ["GPT2LMHeadModel"]}) == "CAUSAL_LM"
    assert task_type_of({"architectures": ["T5ForConditionalGeneration"], "model_type": "t5"}) == "SEQ_2_SEQ_LM"
    assert task_type_of({"architectures": ["BertForSequenceClassification"]}) == "SEQ_CLS"
    assert task_type_of({"architectures": ["BertModel"]}) == "FEATURE_EXTRACTION"
    assert task_type_of({}) is None
    with pytest.raises(AdapterOpsError, match="task type 'LM' is not one of PEFT's"):
        complete_metadata(Adapter({Q: layer(Q, 2, 2, 1)}), task_type="LM")


def test_base_model_is_absolute_and_kept_across_every_format(tmp_path, base, monkeypatch):
    monkeypatch.chdir(base.parent)
    a = Adapter({Q: layer(Q, 4, 8, 1), UP: layer(UP, 2, 3, 2)}, {"base_model": base.name})  # relative, as typed
    assert canonical_base(base.name) == str(base.resolve()) and canonical_base("user/repo") == "user/repo"
    a.save(tmp_path / "a.st")
    with pytest.warns(UserWarning, match="kohya naming is the Stable Diffusion convention"):
        ao.load(tmp_path / "a.st").save(tmp_path / "k.safetensors", format="kohya")
    ao.load(tmp_path / "k.safetensors").save(tmp_path / "p")
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve()) and config["task_type"] == "CAUSAL_LM"
    hub = a.with_metadata(base_model="HuggingFaceTB/SmolLM2-135M-Instruct", task_type="CAUSAL_LM")
    with pytest.warns(UserWarning):
        hub.save(tmp_path / "h.safetensors", format="kohya")
    assert ao.load(tmp_path / "h.safetensors").metadata["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_kohya_for_a_diffusion_model_does_not_warn(tmp_path):
    unet = Adapter({"unet.down_blocks.0.attn.to_q": LoraLayer(torch.randn(2, 4), torch.randn(4, 2), 2.0)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unet.save(tmp_path / "u.safetensors", format="kohya")


def test_cli_says_the_kohya_warning_on_stderr(tmp_path):
    Adapter({Q: layer(Q, 2, 2, 1)}).save(tmp_path / "a.st")
    result = run("convert", tmp_path / "a.st", "--to", "kohya", "-o", tmp_path / "k.safetensors")
    assert result.exit_code == 0
    assert result.stderr.startswith("Warning: kohya naming is the Stable Diffusion convention (lora_unet_*, lora_te_*)")
    assert result.stderr.count("\n") == 1


def test_blend_keeps_agreed_metadata_and_warns_when_bases_differ():
    a = Adapter({Q: layer(Q, 2, 2, 1)}, {"base_model": "org/base", "task_type": "CAUSAL_LM"})
    b = Adapter({Q: layer(Q, 2, 2, 2)}, {"base_model": "org/base", "task_type": "CAUSAL_LM"})
    assert dict(ao.blend([a, b], [0.5, 0.5]).metadata) == {"base_model": "org/base", "task_type": "CAUSAL_LM"}
    with pytest.warns(UserWarning, match=r"different base models \(org/base, org/other\)"):
        mixed = ao.blend([a, b.with_metadata(base_model="org/other")], [1, 1])
    assert "base_model" not in mixed.metadata and mixed.metadata["task_type"] == "CAUSAL_LM"


@pytest.mark.parametrize("arch, expected", [
    ("LlamaForCausalLM", [("modules", "1 layer, e.g. model.layers.0.weird have no llama.cpp tensor name on llama")]),
    ("Qwen2ForCausalLM", [("modules", "1 layer, e.g. model.layers.0.weird have no llama.cpp tensor name on qwen2")]),
    ("FooForCausalLM", [("architecture", "FooForCausalLM is not an architecture adapterops can name for llama.cpp (supported: "
                                         "LLaMAForCausalLM, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)")]),
])
def test_check_llama_cpp_names_modules_with_the_gguf_writers_map(tmp_path, arch, expected):
    g = torch.Generator().manual_seed(0)
    Adapter({name: LoraLayer(torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g), 2.0)
             for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.weird")}).save(tmp_path / "a.st")
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text(json.dumps({"architectures": [arch], "model_type": "llama"}))
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(8, 8), "model.layers.0.weird.weight": torch.zeros(8, 8)},
              str(tmp_path / "base" / "model.safetensors"))
    assert [(p.rule, p.message) for p in check(tmp_path / "a.st", "llama.cpp", base=tmp_path / "base").problems] == expected
