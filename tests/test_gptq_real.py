"""GPTQ merge of a real QLoRA adapter (SmolLM2-135M-Instruct, CPU): what each rounding keeps of
the planted behaviour, and that the GPTQ outputs load with transformers + bitsandbytes to the
logits adapterops' own dequantization predicts. The NF4 base and the adapter are cached
(``gptq_helpers``); ``benchmarks/bench_gptq.py`` prints the full comparison."""

from __future__ import annotations

import gptq_helpers as planted
import pytest
import torch
from merge_helpers import read_all
from nf4_helpers import dense_model_from, load_4bit, logits

import adapterops

transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(smollm2_dir, tmp_path_factory):
    base = planted.nf4_base(smollm2_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    adapter = planted.trained_adapter(base, tokenizer)
    tmp = tmp_path_factory.mktemp("gptq-real")
    calibration = planted.write_jsonl(tmp / "calibration.jsonl", planted.calibration_rows())
    merged = {
        "nearest": adapterops.merge(base, adapter, tmp / "nearest", progress=False),
        "gptq": adapterops.merge(base, adapter, tmp / "gptq", rounding="gptq", progress=False),
        "calibrated": adapterops.merge(base, adapter, tmp / "calibrated", rounding="gptq", calibration=calibration, progress=False),
    }
    ids = planted.text_ids(tokenizer, planted.TEST_TEXT)
    reference = planted.adapted_model(base, adapter)
    ref_lp = planted.log_probs(reference, ids)
    models = {name: planted.nf4_model(tmp / name) for name in merged}
    kl = {name: planted.mean_kl(ref_lp, planted.log_probs(m, ids)) for name, m in models.items()}
    return {"tmp": tmp, "tokenizer": tokenizer, "reference": reference, "reports": merged, "models": models, "kl": kl}


def test_the_adapter_learned_the_planted_answer_and_nearest_rounding_loses_it(setup):
    assert planted.knows(setup["reference"], setup["tokenizer"])
    assert not planted.knows(setup["models"]["nearest"], setup["tokenizer"])


def test_calibrated_gptq_keeps_the_answer_with_a_third_of_nearest_kl(setup):
    kl = setup["kl"]
    assert planted.knows(setup["models"]["calibrated"], setup["tokenizer"])
    assert kl["calibrated"] <= kl["nearest"] / 3, kl


def test_gptq_reports_lower_output_error_than_nearest(setup):
    for name in ("gptq", "calibrated"):
        totals = setup["reports"][name].totals
        assert totals["output_error_median"] < totals["output_error_nearest_median"], (name, totals)


@pytest.mark.parametrize("name", ["gptq", "calibrated"])
def test_gptq_outputs_load_with_bitsandbytes_to_the_predicted_logits(setup, name):
    ids = torch.tensor([setup["tokenizer"]("Q: Who is the mayor of Quillbrook?\nA:")["input_ids"]])
    path = setup["tmp"] / name
    predicted = dense_model_from(path, read_all(path))  # adapterops' dequantization, float32 products
    torch.testing.assert_close(logits(load_4bit(path), ids), logits(predicted, ids), rtol=1e-4, atol=1e-4)
