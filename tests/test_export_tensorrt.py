"""``to_tensorrt``: its missing-dependency error, the aten-lowered step it compiles (checked on
the CPU through torch.export), and the compiled engine itself where torch_tensorrt and CUDA are."""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch

import dyllm_fx
from dyllm_fx.eval.synthetic_tasks import held_out_set
from dyllm_fx.export import ExportableStep, TensorRTUnavailable, to_tensorrt
from dyllm_fx.export.driver import ExportedStepModel, TorchBackend, build_policy
from dyllm_fx.export.metadata import step_graph_info
from dyllm_fx.export.step_module import dynamic_shapes, example_inputs
from dyllm_fx.export.tensorrt import INSTALL

# Slow (`-m "not slow"` leaves it out): lowers and exports step graphs.
pytestmark = pytest.mark.slow

HAS_TENSORRT = importlib.util.find_spec("torch_tensorrt") is not None and torch.cuda.is_available()


@pytest.fixture(scope="module")
def embedded():
    return dyllm_fx.load("default", device="cpu")


def _prompts() -> list[str]:
    return [e.prompt for e in held_out_set(2, tasks=("shift",)) + held_out_set(1, tasks=("add",))]


def test_missing_dependency_names_the_install(embedded):
    if HAS_TENSORRT:
        pytest.skip("torch_tensorrt and a CUDA GPU are present: nothing is missing")
    model, _ = embedded
    with pytest.raises(TensorRTUnavailable, match=re.escape('pip install "dyllm-fx[tensorrt]"')):
        to_tensorrt(dyllm_fx.transform(model, policy="dual_cache"))


def test_lowered_step_exports_to_aten_and_decodes_like_the_engine(embedded):
    """What to_tensorrt hands to torch_tensorrt: a torch.export program of aten ops only
    (no dyllm op left to fall back on PyTorch), which decodes the same tokens as the engine."""
    model, tokenizer = embedded
    fast = dyllm_fx.transform(model, policy="dual_cache")
    step = ExportableStep(fast.program, lower_ops=True).eval()
    with torch.no_grad():
        exported = torch.export.export(
            step,
            example_inputs(fast.program, torch.device("cpu")),
            dynamic_shapes=dynamic_shapes(step.n_layers, 8, 256),
        )
    namespaces = {
        n.target.namespace
        for n in exported.graph.nodes
        if n.op == "call_function" and hasattr(n.target, "namespace")
    }
    assert namespaces <= {"aten"}, namespaces
    info = step_graph_info(fast, "default")
    runner = ExportedStepModel(TorchBackend(exported.module(), "cpu"), info, build_policy(info, None))
    prompts = _prompts()
    expected = dyllm_fx.generate(fast, tokenizer, prompts)
    got = dyllm_fx.generate(runner, tokenizer, prompts)
    assert torch.equal(got.sequences, expected.sequences)
    assert runner.engine.records[1].active[0] == 32  # dual cache: the block only after the refresh


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_TENSORRT, reason=f"needs torch_tensorrt and a CUDA GPU: {INSTALL}")
def test_tensorrt_engine_generates():
    model, tokenizer = dyllm_fx.load("default", device="cuda", dtype=torch.float32)
    fast = dyllm_fx.transform(model, policy="dual_cache")
    trt_model = to_tensorrt(fast, max_batch=4, max_seq=128, model_path="default")
    prompts = _prompts()
    got = dyllm_fx.generate(trt_model, tokenizer, prompts)
    expected = dyllm_fx.generate(fast, tokenizer, prompts)
    assert got.texts[:2] == expected.texts[:2] == [e.answer for e in held_out_set(2, tasks=("shift",))]


def test_row_policy_without_tensorrt_names_the_install():
    if HAS_TENSORRT:
        pytest.skip("torch_tensorrt and a CUDA GPU are present: nothing is missing")
    from tiny_checkpoints import tiny_llada

    with pytest.raises(TensorRTUnavailable, match=re.escape('pip install "dyllm-fx[tensorrt]"')):
        to_tensorrt(dyllm_fx.transform(tiny_llada(seed=1, n_layers=2), policy="dyllm"))


def test_row_policy_programs_are_aten_and_decode_like_the_engine():
    """What to_tensorrt compiles for a row policy: one torch.export program per plan key, aten
    ops only (the gating included), which decode the engine's tokens as the step engine's runner."""
    from dyllm_fx.export import Layout, record_plan_keys
    from dyllm_fx.export.driver import PlanStepModel, TorchPlanBackend, plan_policy
    from dyllm_fx.export.plans import build_plan_step
    from dyllm_fx.export.tensorrt import export_plan_programs
    from tiny_checkpoints import tiny_llada, tiny_tokenizer

    tok, model = tiny_tokenizer(), tiny_llada(seed=21, n_layers=2)
    prompts = ["rev:abc=", "kv:a1,b2?ab="]
    gen = dict(gen_length=16, block_length=8, steps=16, stop_at_eos=False, progress=False)
    fast = dyllm_fx.transform(model, policy="dual_cache+dyllm")
    with record_plan_keys(fast) as keys:
        expected = dyllm_fx.generate(fast, tok, prompts, **gen)
    build = build_plan_step(fast, Layout(16, 8, max_seq=40), keys, by_shape=False)
    programs = export_plan_programs(build, max_batch=8)
    assert len(programs) == len(keys) >= 2
    targets = [{n.target for n in p.graph.nodes if n.op == "call_function"} for p in programs]
    namespaces = {t.namespace for ts in targets for t in ts if hasattr(t, "namespace")}
    assert namespaces <= {"aten"}, namespaces
    assert any(
        torch.ops.aten.sort.stable in ts for ts in targets
    )  # the gating (select_top) is in the program
    info = build.graph_info(fast, "default")
    runner = PlanStepModel(
        TorchPlanBackend([p.module() for p in programs], "cpu"), info, plan_policy(info, None)
    )
    got = dyllm_fx.generate(runner, tok, prompts, **gen)
    assert torch.equal(got.sequences, expected.sequences)
    assert [r.kind for r in runner.engine.records] == [r.kind for r in fast.engine.records]
