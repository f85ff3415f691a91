"""Run by tests/test_vllm_interop.py under vLLM's own Python (a separate environment).

Reads a JSON request on stdin: ``{"base", "loras": {name: dir}, "max_lora_rank", "prompt", "max_tokens"}``;
writes on stdout one JSON line: per LoRA (and ``None`` for the base alone) the greedy token ids and
their logprobs, or the error with which vLLM's admission check (``PEFTHelper.validate_legal``)
refused that LoRA.
"""

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main() -> None:
    request = json.load(sys.stdin)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.lora.request import LoRARequest

    llm = LLM(
        model=request["base"],
        dtype=request.get("dtype", "float32"),
        enable_lora=True,
        max_lora_rank=request["max_lora_rank"],
        max_loras=1,
        max_model_len=256,
        enforce_eager=True,
        seed=0,
    )
    params = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], logprobs=1)
    prompt = TokensPrompt(prompt_token_ids=request["prompt"])
    results = {}
    for i, (name, path) in enumerate([(None, None), *request["loras"].items()]):
        if path is not None:
            # vLLM's own admission check (what its LoRA worker manager runs before loading); an adapter
            # it refuses is not sent to the engine, whose request would then never finish.
            try:
                PEFTHelper.from_local_dir(path, None).validate_legal(LoRAConfig(max_lora_rank=request["max_lora_rank"]))
            except ValueError as exc:
                results[str(name)] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
        lora = None if path is None else LoRARequest(name, i, path)
        print(f"vllm_worker: generating with {name or 'the base alone'}", file=sys.stderr, flush=True)
        out = llm.generate([prompt], params, lora_request=lora, use_tqdm=False)[0].outputs[0]
        logprobs = [step[token].logprob for step, token in zip(out.logprobs, out.token_ids)]
        results[str(name)] = {"tokens": list(out.token_ids), "logprobs": logprobs}
    sys.stdout.write("\n" + json.dumps(results) + "\n")


if __name__ == "__main__":
    main()
