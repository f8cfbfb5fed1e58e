"""Golden tokens: what ``generate()`` decodes for every policy and composition on the embedded
models, captured once and kept in ``tests/golden/tokens.json``.

A refactor of the runtime must leave every token as it was; ``tests/test_golden_tokens.py``
compares against the file. Re-capture only for a change that is meant to change tokens (say so in
the commit): ``python tests/golden_tokens.py --write``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

GOLDEN = Path(__file__).parent / "golden" / "tokens.json"

# Every policy and composition the project ships, exact and approximating alike.
POLICIES = (
    "dense",
    "prefix_cache",
    "dual_cache",
    "dllm_cache",
    "es_dllm",
    "dyllm",
    "prefix_cache+dyllm",
    "dual_cache+dyllm",
    "dual_cache+es_dllm",
    "prefix_cache+es_dllm",
    "dual_cache+dllm_cache",
)
MODELS = ("default", "default-dream")
# A ragged pair (left padding) of held-out style prompts the models answer.
PROMPTS = ("shift:helloworldthisis=", "sort:dcba=")
SETTINGS = {
    "steps": dict(gen_length=64, block_length=32, steps=32),
    "threshold": dict(gen_length=64, block_length=32, threshold=0.9),
}


def case_key(model: str, policy: str, setting: str) -> str:
    return f"{model}|{policy}|{setting}"


def sampler_args(model: str, setting: str) -> dict:
    # Dream's default entropy order has no probability to threshold: maskgit_plus, as documented.
    return {"alg": "maskgit_plus"} if model == "default-dream" and setting == "threshold" else {}


def run_case(model, tokenizer, model_name: str, policy: str, setting: str) -> list[list[int]]:
    import dyllm_fx

    fast = dyllm_fx.transform(model, policy=policy)
    out = dyllm_fx.generate(
        fast, tokenizer, list(PROMPTS), **SETTINGS[setting], **sampler_args(model_name, setting)
    )
    return out.responses.tolist()


def capture() -> dict[str, list[list[int]]]:
    import dyllm_fx

    torch.set_num_threads(1)
    tokens = {}
    for model_name in MODELS:
        model, tokenizer = dyllm_fx.load(model_name)
        for policy in POLICIES:
            for setting in SETTINGS:
                tokens[case_key(model_name, policy, setting)] = run_case(
                    model, tokenizer, model_name, policy, setting
                )
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help=f"write {GOLDEN}")
    args = parser.parse_args()
    tokens = capture()
    if args.write:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(tokens, indent=0) + "\n")
        print(f"wrote {len(tokens)} cases to {GOLDEN}")
    else:
        print(json.dumps(tokens)[:2000])


if __name__ == "__main__":
    main()
