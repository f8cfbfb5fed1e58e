"""Pass 1 (passes/capture.py): one denoising forward as a symbolic aten graph."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from dyllm_fx.models.layers import default_position_ids
from dyllm_fx.passes.capture import INPUT_NAMES, _drop_noop_conversions, capture_module, example_inputs
from tiny_checkpoints import tiny_llada

aten = torch.ops.aten


@pytest.fixture(scope="module")
def model():
    return tiny_llada(seed=3)


@pytest.fixture(scope="module")
def captured(model):
    return capture_module(model)


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_symbolic_sizes_reproduce_logits_on_other_shapes(model, captured):
    traced_batch, traced_len = example_inputs()[0].shape
    gen = torch.Generator().manual_seed(0)
    for batch, seq in ((3, 11), (1, 5)):
        assert (batch, seq) != (traced_batch, traced_len)
        ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=gen)
        mask = torch.ones_like(ids)
        mask[-1, :2] = 0  # a left-padded row
        pos = default_position_ids(ids, mask)
        with torch.no_grad():
            got = captured.gm(ids, mask, pos)
            want = model(ids, attention_mask=mask, position_ids=pos)
        assert got.shape == (batch, seq, model.config.vocab_size)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_sizes_are_symbols_and_inputs_are_named(captured):
    assert captured.batch_symbol != captured.seq_symbol
    assert not captured.batch_symbol.isdigit() and not captured.seq_symbol.isdigit()
    placeholders = [n for n in captured.gm.graph.nodes if n.op == "placeholder"]
    assert tuple(n.name for n in placeholders) == INPUT_NAMES
    ids_shape = placeholders[0].meta["val"].shape
    assert (str(ids_shape[0]), str(ids_shape[1])) == (captured.batch_symbol, captured.seq_symbol)


def test_graph_keeps_whole_ops(model, captured):
    targets = _targets(captured.gm)
    n_layers = model.config.n_layers
    assert targets.count(aten.scaled_dot_product_attention.default) == n_layers
    # q, k, v, o + three MLP linears per block, and the LM head
    assert targets.count(aten.linear.default) == 7 * n_layers + 1
    assert targets.count(aten.embedding.default) == 1
    # nothing was decomposed: no matmul / softmax spelled out
    assert aten.mm.default not in targets and aten._softmax.default not in targets


def test_noop_conversions_are_dropped(model, captured):
    # The remaining conversions all change dtype or device (position ids -> float, mask -> bool).
    for node in captured.gm.graph.nodes:
        if node.op == "call_function" and node.target in (aten.to.dtype, aten.to.dtype_layout):
            before, after = node.args[0].meta["val"], node.meta["val"]
            assert (before.dtype, before.device) != (after.dtype, after.device), node.format_node()

    # The raw trace does contain no-op `x.float()` aliases (RMSNorm on float32), and the step removes them
    def forward(ids, mask, pos):
        return model(ids, attention_mask=mask, position_ids=pos)

    with torch.no_grad():
        raw = make_fx(forward, tracing_mode="symbolic", pre_dispatch=True, _allow_non_fake_inputs=True)(
            *example_inputs()
        )

    def noops(gm):
        return [
            n
            for n in gm.graph.nodes
            if n.op == "call_function"
            and n.target in (aten.to.dtype, aten.to.dtype_layout)
            and n.args[0].meta["val"].dtype == n.meta["val"].dtype
        ]

    dropped = len(noops(raw))
    assert dropped, "the test model no longer produces no-op conversions; this test checks nothing"
    n_before = len(raw.graph.nodes)
    _drop_noop_conversions(raw)
    assert not noops(raw)
    assert len(raw.graph.nodes) == n_before - dropped  # only the no-ops went
    raw.recompile()
    ids, mask, pos = example_inputs(batch=2, seq_len=6)
    with torch.no_grad():
        torch.testing.assert_close(raw(ids, mask, pos), model(ids, mask, pos), rtol=0, atol=1e-6)


def test_param_names_map_constants_to_model_parameters(model, captured):
    params = dict(model.named_parameters())
    get_attrs = [n for n in captured.gm.graph.nodes if n.op == "get_attr"]
    assert set(captured.param_names) == {n.target for n in get_attrs}
    assert set(captured.param_names.values()) == set(params)  # every parameter, each once
    for target, name in captured.param_names.items():
        const = getattr(captured.gm, target)
        assert const.data_ptr() == params[name].data_ptr()  # shares storage, no copy
        assert const.shape == params[name].shape
    embedding = next(n for n in captured.gm.graph.nodes if n.target is aten.embedding.default)
    assert captured.param_names[embedding.args[0].target] == "model.transformer.wte.weight"
