"""The one pass pipeline (``passes/pipeline.py``) and the adapter registry that every caller asks."""

from __future__ import annotations

import types

import pytest
import torch

from dyllm_fx.adapters import ADAPTERS, adapter_for
from dyllm_fx.adapters.diffusion_gemma import DiffusionGemmaAdapter
from dyllm_fx.adapters.llada_dream import LLaDADreamAdapter
from dyllm_fx.passes.capture import capture_module, example_inputs
from dyllm_fx.passes.pipeline import PASSES, Pass, PassPipeline
from tiny_checkpoints import tiny_llada


def test_the_passes_run_in_the_documented_order():
    assert PASSES.names == (
        "check_bidirectional",
        "find_blocks",
        "split_pieces",
        "split_attention",
        "rewrite_attention",
    )


def test_a_pipeline_refuses_repeated_names_and_one_that_builds_no_program():
    noop = Pass("noop", lambda state: None)
    with pytest.raises(ValueError, match="unique"):
        PassPipeline([noop, noop])
    captured = types.SimpleNamespace(gm=None)
    with pytest.raises(ValueError, match="built no program"):
        PassPipeline([noop]).run(captured, ())


def test_the_pipeline_builds_a_program_with_every_attention_rewritten():
    model = tiny_llada(seed=3)
    program = PASSES.run(capture_module(model), example_inputs())
    assert len(program.attn) == len(program.attn_parts) == model.config.n_layers
    # a pipeline that leaves split_attention out builds the pieces but no attention parts
    partial = PassPipeline([p for p in PASSES.passes if p.name != "split_attention"])
    assert partial.run(capture_module(model), example_inputs()).attn_parts == []


def test_each_model_gets_its_family_adapter():
    gemma_like = types.SimpleNamespace(
        config=types.SimpleNamespace(model_type="diffusion_gemma"),
        model=types.SimpleNamespace(encoder=torch.nn.Identity(), decoder=torch.nn.Identity()),
    )
    assert isinstance(adapter_for(gemma_like), DiffusionGemmaAdapter)
    assert adapter_for(gemma_like).runs_own_loop
    assert isinstance(adapter_for(tiny_llada()), LLaDADreamAdapter)
    assert isinstance(adapter_for(None), LLaDADreamAdapter)  # a compiled free function
    assert isinstance(ADAPTERS[-1], LLaDADreamAdapter)  # the fallback comes last
