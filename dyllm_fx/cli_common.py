"""Command-line pieces shared by ``dyllm eval``, ``dyllm plot`` (and ``dyllm generate``'s
decoding arguments): policy selection and the decoding keyword arguments of ``generate``."""

from __future__ import annotations

import argparse

from .loading import DEFAULT_MODEL
from .policy_setup import VANILLA


def add_model_args(p: argparse.ArgumentParser, default_policy: str = VANILLA) -> None:
    """--model, --device, --policy, --policy-arg, --compile."""
    p.add_argument("--model", default=DEFAULT_MODEL, help="model folder, or 'default' for the embedded model")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    from .runtime.policies import POLICIES

    p.add_argument(
        "--policy", default=default_policy,
        help=f"'vanilla' (untransformed model) or a transform() policy: {', '.join(sorted(POLICIES))} "
             f"(default {default_policy})",
    )
    p.add_argument(
        "--policy-arg", action="append", default=[], metavar="KEY=VALUE",
        help="a policy parameter, repeatable (numbers parsed; lists as 0,1,2), e.g. --policy-arg tau=0.99",
    )
    p.add_argument("--compile", action="store_true", help="compile the transformed pieces with inductor")


def decoding_kwargs(args: argparse.Namespace) -> dict:
    """``generate()`` keyword arguments from the decoding argument group."""
    params = dict(
        gen_length=args.gen_length, block_length=args.block_length, steps=args.steps, threshold=args.threshold,
        cfg_scale=args.cfg_scale, chat=args.chat, seed=args.seed, temperature=args.temperature,
    )
    if args.remasking:
        params["remasking"] = args.remasking
    if args.alg:
        params["alg"] = args.alg
    return params
