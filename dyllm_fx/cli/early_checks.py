"""The command-line checks that need no model, run before torch is imported.

A mistake on the command line (an empty prompt, ``--steps 0``, an unknown policy, a NaN, a count
of 0, an output path that cannot be written) is reported in well under a second, not after
importing torch and transformers, loading weights or running a benchmark. The checks that need
the model (its config, the sampler of its family, a policy's parameters) stay in
``common_args.check_run``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..errors import UsageError
from ..eval.jsonl_tasks import SUITE
from ..policy_setup import COMPOSITIONS, POLICY_NAMES, VANILLA, parse_policy_args
from ..runtime.schedule import BlockSchedule
from ..values import check_output_path

# Options (by argparse dest) and the range each must lie in, on every command that has them.
AT_LEAST_ONE = ("threads", "n", "batch_size", "repeats", "limit", "max_num_seqs", "max_num_batches")
AT_LEAST_ONE += ("max_queue_size", "replicas", "max_replicas", "tensor_parallel_size")
AT_LEAST_ZERO = ("temperature", "cfg_scale", "cpus_per_replica", "gpus_per_replica")
POSITIVE = ("lifetime", "tau")
UNIT_INTERVAL = ("threshold",)  # a confidence: (0, 1]

# The files each command writes, checked writable (their folder created) before any work.
OUTPUT_PATHS = {"bench": ("json", "plot"), "eval": ("json",), "plot": ("out",)}

# Commands whose options these checks know; export checks its own (dyllm_fx/cli/export.py).
CHECKED = ("generate", "eval", "plot", "bench", "serve")


def check_before_imports(args: argparse.Namespace) -> None:
    """Every check of ``args`` that needs neither torch nor the model; a UsageError naming the fix."""
    if args.command == "export":
        _check_numbers(args, ("threads",))
        return
    if args.command not in CHECKED:
        return
    _check_numbers(args, AT_LEAST_ONE + AT_LEAST_ZERO + POSITIVE + UNIT_INTERVAL)
    _check_prompts(args)
    if args.command != "bench" and hasattr(args, "policy"):
        check_policy_name(args.policy)
        parse_policy_args(args.policy_arg)  # key=value syntax
    if getattr(args, "compare", False):
        if args.policy == VANILLA:
            raise UsageError("--compare runs vanilla beside a policy: give one, e.g. --policy dual_cache")
        if args.onnx:
            raise UsageError("--compare runs the torch model beside vanilla; drop --onnx")
    if args.command == "generate" and args.onnx:
        _check_onnx_input(args)
    if hasattr(args, "gen_length"):
        _check_layout(args)
    if args.command == "bench":
        _check_tasks(args.tasks)
    if args.command == "serve":
        _check_serve(args)
    if args.command == "eval" and args.task != SUITE and not Path(args.task).is_file():
        raise UsageError(f"--task {args.task}: no such file; give a JSONL file or 'suite'")
    if args.command == "plot" and args.plot == "pareto" and not Path(args.bench).is_file():
        raise UsageError(f"no benchmark JSON at {args.bench}; write one with `dyllm bench --json FILE`")
    for dest in OUTPUT_PATHS.get(args.command, ()):
        if getattr(args, dest, None):
            check_output_path(getattr(args, dest), f"--{dest}")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _check_numbers(args: argparse.Namespace, dests: tuple[str, ...]) -> None:
    for dest in dests:
        value = getattr(args, dest, None)
        if value is None or isinstance(value, bool):  # absent, default, or a flag of that name
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{_flag(dest)} must be a finite number, got {value}")
        if dest in AT_LEAST_ONE and value < 1:
            raise UsageError(f"{_flag(dest)} must be at least 1, got {value}")
        if dest in AT_LEAST_ZERO and value < 0:
            raise UsageError(f"{_flag(dest)} must be at least 0, got {value}")
        if dest in POSITIVE and value <= 0:
            raise UsageError(f"{_flag(dest)} must be positive, got {value}")
        if dest in UNIT_INTERVAL and not 0 < value <= 1:
            raise UsageError(f"{_flag(dest)} must be in (0, 1], got {value}; 0.9 is the Fast-dLLM default")


def _check_serve(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    if args.max_replicas is not None and (args.replicas is None or args.max_replicas < args.replicas):
        raise UsageError(
            f"--max-replicas must be >= --replicas ({args.replicas or 'not given'}), got {args.max_replicas}"
        )
    if args.replicas is not None:
        from ..serving.replicas import check_replica_gpus, require_ray

        check_replica_gpus(args.tensor_parallel_size, args.gpus_per_replica)
        require_ray()  # Ray missing: the pip command, before anything loads


def _check_prompts(args: argparse.Namespace) -> None:
    prompts = list(getattr(args, "prompts", None) or [])
    if getattr(args, "prompt", None) is not None:
        prompts.append(args.prompt)
    for i, prompt in enumerate(prompts):
        if not prompt.strip():
            where = "the prompt" if len(prompts) == 1 else f"prompt {i + 1}"
            raise UsageError(f"{where} is empty; give the text to continue, e.g. dyllm generate '12+7='")


def check_policy_name(policy: str) -> None:
    """An unknown policy name (or part of a composition), listing the known ones; the composition
    rules and the parameters are checked with the policy objects (``policy_setup.check_policy``)."""
    if policy == VANILLA:
        return
    unknown = [name for name in policy.split("+") if name not in POLICY_NAMES]
    if unknown:
        raise UsageError(
            f"unknown policy {unknown[0]!r}; use {VANILLA!r} (the untransformed model), one of "
            f"{', '.join(POLICY_NAMES)}, or a composition such as {COMPOSITIONS[0]}"
        )


def _check_onnx_input(args: argparse.Namespace) -> None:
    if args.compile or args.dtype:
        raise UsageError(
            "--compile and --dtype do not apply to --onnx: the step graph's dtype and ops are fixed at export"
        )
    if not Path(args.onnx).is_file():
        raise UsageError(f"--onnx {args.onnx}: no such file; write one with `dyllm export --onnx FILE`")


def _check_layout(args: argparse.Namespace) -> None:
    """The block layout that ``generate()`` will build from the same options (bench's --threshold
    is for its '+ threshold' rows only: its other rows use the steps)."""
    steps = args.gen_length if args.steps is None else args.steps
    if getattr(args, "threshold", None) is not None and args.command != "bench":
        steps = None  # threshold decoding: steps per block are not fixed
    BlockSchedule.build(0, args.gen_length, args.block_length, steps)


def _check_tasks(tasks: str) -> None:
    from ..eval.synthetic_tasks import TASKS

    unknown = [t.strip() for t in tasks.split(",") if t.strip() not in TASKS]
    if unknown:
        raise UsageError(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
