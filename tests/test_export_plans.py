"""Row policies exported to ONNX (dyllm_fx/export/plan_keys.py, policy_step.py, onnx_plans.py):
each plan key's step is a graph of standard ops, onnxruntime decodes the torch engine's tokens
on ragged batches, and the plan-key lists cover what real generations reach.

Exporting is slow on a 2-core CPU (20 to 40 s per plan key for a 2-layer model), so the
exports here are few: DyLLM, ES-dLLM and dLLM-Cache on a tiny LLaDA with the keys a
calibration run met (``record_plan_keys``), and ``dual_cache+dyllm`` on a tiny Dream (GQA,
shifted logits) through ``dyllm export`` with the layout's whole key list. The key lists
themselves are checked against many generations without exporting anything.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tiny_checkpoints import tiny_dream, tiny_llada, tiny_tokenizer, write_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import dyllm_fx  # noqa: E402
from dyllm_fx.cli.main import main  # noqa: E402
from dyllm_fx.export import (  # noqa: E402
    ExportedPlanMissing,
    ExportError,
    Layout,
    load_onnx,
    plan_keys,
    record_plan_keys,
    to_onnx,
)
from dyllm_fx.export.plan_keys import (  # noqa: E402
    ANY,
    SEQ,
    KeyRange,
    bind,
    branch_key,
    branch_sizes,
    branches,
    graph_key,
    size_count,
    with_sizes,
)
from dyllm_fx.runtime.policies import make_policy  # noqa: E402
from dyllm_fx.runtime.policies.dllm_cache import AdaptiveKey  # noqa: E402
from dyllm_fx.runtime.policies.dyllm import SparseKey  # noqa: E402
from dyllm_fx.runtime.policies.es_dllm import SkipKey  # noqa: E402

# Slow (`-m "not slow"` leaves it out): exports and decodes an ONNX graph per policy.
pytestmark = pytest.mark.slow

TOK = tiny_tokenizer()
PROMPTS = ["rev:abc=", "kv:a1,b2?ab="]  # different lengths: a left-padded batch
GEN = dict(gen_length=16, block_length=8, steps=16, stop_at_eos=False, progress=False)
LAYOUT = dict(gen_length=16, block_length=8, max_seq=40)
LOGITS_ATOL = 5e-4  # as tests/test_export_onnx.py: float32 summation order only


def _sharpen(model):
    head = (
        model.model.transformer.ff_out.weight if hasattr(model.model, "transformer") else model.lm_head.weight
    )
    with torch.no_grad():
        head.mul_(3.0)  # larger logit gaps: no near-ties between runs
        head[model.diffusion.mask_token_id] = 0.0  # never predicts the mask itself: every block completes
    return model


@pytest.fixture(scope="module")
def llada():
    return _sharpen(tiny_llada(seed=21, n_layers=2))


def _walk(graph):
    """Every node of a graph and of its subgraphs (the If branches)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _walk(attr.g)


def _logits_of(step_owner):
    """Record every step's logits of a TransformedModel or an ONNX plan model."""
    engine = step_owner.engine
    seen, step = [], engine.step

    def recording(*args, **kwargs):
        out = step(*args, **kwargs)
        seen.append(out.logits.clone())
        return out

    engine.step = recording
    return seen


class Export:
    """A row policy exported with the keys one calibration generation met."""

    def __init__(self, model, tmp, name, prompts=PROMPTS, gen=GEN, **cfg):
        self.model, self.name, self.cfg, self.prompts, self.gen = model, name, cfg, prompts, gen
        self.fast = dyllm_fx.transform(model, policy=name, **cfg)
        with record_plan_keys(self.fast) as keys:
            self.expected = dyllm_fx.generate(self.fast, TOK, prompts, **gen)
        self.keys = list(keys)
        self.path = to_onnx(self.fast, tmp / f"{name}.onnx", keys=self.keys, **LAYOUT)


@pytest.fixture(scope="module")
def dyllm_export(llada, tmp_path_factory):
    return Export(llada, tmp_path_factory.mktemp("dyllm"), "dyllm")


@pytest.fixture(scope="module")
def es_export(llada, tmp_path_factory):
    return Export(llada, tmp_path_factory.mktemp("es"), "es_dllm")


@pytest.fixture(scope="module")
def cache_export(llada, tmp_path_factory):
    return Export(llada, tmp_path_factory.mktemp("cache"), "dllm_cache")


# --- the graphs -----------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["dyllm_export", "es_export", "cache_export"])
def test_graph_is_standard_onnx_with_one_branch_per_kind_of_step(which, request):
    exp = request.getfixturevalue(which)
    proto = onnx.load(str(exp.path))
    onnx.checker.check_model(proto, full_check=True)
    nodes = list(_walk(proto.graph))
    assert {n.domain for n in nodes} | {f.domain for f in proto.functions} <= {"", "ai.onnx"}
    assert not any("dyllm" in n.op_type for n in nodes)
    props = {p.key: p.value for p in proto.metadata_props}
    plans, kinds = json.loads(props["dyllm.plans"]), json.loads(props["dyllm.branches"])
    assert len(plans) == len(exp.keys) and props["dyllm.graph"] == "plans"
    assert len(kinds) == len({branch_key(k) for k in exp.keys})  # keys differing only in sizes share one
    assert sorted({p["branch"] for p in plans}) == list(range(len(kinds)))
    assert sum(n.op_type == "If" for n in nodes) == len(kinds) - 1  # a chain of If over the `plan` input
    ops = {n.op_type for n in nodes}
    assert {"TopK", "GatherElements", "Where"} <= ops  # the gating is inside the graph
    assert ops & {"ScatterElements", "ScatterND"}  # and so are the row writes (scatter_ / index_put_)
    dims = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input
    }
    assert (
        dims["input_ids"] == ["batch", "seq"]
        and dims["plan"] == []
        and dims["k_cache_1"] == ["batch", 4, "seq", 8]
    )
    assert dims["logit_positions"] == ["batch", "positions"]
    # the weights are stored once, whatever the number of branches
    weights = sum(int(np.prod(i.dims)) for i in proto.graph.initializer if len(i.dims) == 2)
    assert weights < 1.5 * sum(p.numel() for p in exp.fast.parameters() if p.dim() == 2)


def test_dyllm_graph_holds_its_buffers_and_tau(dyllm_export):
    proto = onnx.load(str(dyllm_export.path))
    names = [i.name for i in proto.graph.input]
    assert names[:9] == [
        "input_ids",
        "attention_mask",
        "position_ids",
        "logit_positions",
        "span_start",
        "span_len",
        "tau",
        "size_0",  # a sparse step's span width and capacity, as the lengths of two inputs
        "size_1",
    ]
    dims = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input
    }
    assert dims["size_0"] == ["size_0"] and dims["size_1"] == ["size_1"]
    assert {"context_0", "mlp_1", "prev_ids", "hidden"} <= set(names)
    outputs = [o.name for o in proto.graph.output]
    assert outputs[:3] == ["logits", "eligible", "counts"] and "context_0_out" in outputs
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["dyllm.params"]) == {"tau": 0.99}
    assert json.loads(props["dyllm.policy_config"])["capacity"] == "auto"
    keys = [tuple(p["key"][:2]) for p in json.loads(props["dyllm.plans"])]
    assert ("sparse", SEQ) in keys  # a full-query step: its width is the sequence axis


# --- onnxruntime against the torch engine ---------------------------------------------------


def test_one_branch_serves_every_size_of_its_keys(llada, tmp_path):
    """A sparse step's span width and capacity are inputs of one graph: onnxruntime gives the
    eager step's outputs at capacities below and equal to the span, for spans below and equal
    to the sequence (the sizes the trace did not see included), from a state that is not zero."""
    from dyllm_fx.export.plans import build_plan_step
    from dyllm_fx.export.policy_step import size_inputs

    fast = dyllm_fx.transform(llada, policy="dyllm")
    keys = [
        SparseKey(SEQ, SEQ, "exact", False, None),
        SparseKey(SEQ, 8, "exact", False, None),
        SparseKey(16, 16, "exact", False, None),
        SparseKey(16, 9, "exact", False, None),
    ]
    path = to_onnx(fast, tmp_path / "sizes.onnx", keys=keys, progress=False, **LAYOUT)
    proto = onnx.load(str(path))
    props = {p.key: p.value for p in proto.metadata_props}
    assert len(json.loads(props["dyllm.branches"])) == 1
    assert not any(n.op_type == "If" for n in proto.graph.node)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    build = build_plan_step(fast, Layout(**LAYOUT).check(None), keys)
    step, branch = build.step, build.branches[0]
    example = list(build.example(0))
    seq_len, first_size = example[0].shape[1], 6 + len(step.params)
    gen = torch.Generator().manual_seed(0)
    for i in range(first_size + step.n_sizes, len(example)):  # a state as after a few steps
        if example[i].is_floating_point():
            example[i] = torch.randn(example[i].shape, generator=gen)
    for key in keys:
        bound = bind(key, seq_len)
        args = list(example)
        sizes = size_inputs(branch_sizes(branch.key, bound), step.n_sizes)
        args[first_size : first_size + step.n_sizes] = sizes
        args[4][:] = seq_len - bound.width  # the span: the last `width` rows
        args[5][:] = bound.width
        with build.tracing():
            step.key = branch.key
            want = step(*args)
        got = session.run(None, {n: a.numpy() for n, a in zip(names, [*args, torch.tensor(0)])})
        assert torch.equal(torch.from_numpy(got[2]), want[2]), key  # the counts: rows selected, kept
        for g, w in zip(got, want):
            if g.dtype.kind == "f":
                assert np.allclose(g, w.numpy(), atol=LOGITS_ATOL), key
            else:
                assert np.array_equal(g, w.numpy()), key


@pytest.mark.parametrize("which", ["dyllm_export", "es_export", "cache_export"])
def test_onnxruntime_decodes_the_engines_tokens(which, request):
    exp = request.getfixturevalue(which)
    onnx_model = load_onnx(exp.path, threads=1, tokenizer=TOK)
    logits = _logits_of(onnx_model)
    reference = dyllm_fx.transform(exp.model, policy=exp.name, **exp.cfg)
    want = _logits_of(reference)
    expected = dyllm_fx.generate(reference, TOK, exp.prompts, **exp.gen)
    got = dyllm_fx.generate(onnx_model, TOK, exp.prompts, **exp.gen)
    assert torch.equal(got.sequences, expected.sequences)
    assert torch.equal(got.sequences, exp.expected.sequences)
    assert got.stats.nfe == expected.stats.nfe and len(logits) == len(want)
    assert max((a - b).abs().max().item() for a, b in zip(logits, want)) < LOGITS_ATOL
    # the same rows approximated beyond the capacities on both sides (the tokens above are equal)
    assert got.stats.overflow == expected.stats.overflow
    kinds = [r.kind for r in onnx_model.engine.records]
    assert kinds == [r.kind for r in reference.engine.records] and len(set(kinds)) >= 2


def test_a_step_over_its_capacity_runs_again_in_onnxruntime(llada, tmp_path):
    """A step whose salient rows exceed its capacity runs again at the span's capacity, from the
    state it started from (overflow='rerun', the default), under onnxruntime as in the engine:
    the same reruns, the same tokens. The rerun's key is not among the recorded ones (a rerun is
    not planned), so its branch serves it at the span's capacity."""
    exp = Export(llada, tmp_path, "dyllm", capacity=2)
    reference = dyllm_fx.transform(llada, policy="dyllm", capacity=2)
    want = dyllm_fx.generate(reference, TOK, PROMPTS, **GEN)
    onnx_model = load_onnx(exp.path, threads=1, tokenizer=TOK)
    got = dyllm_fx.generate(onnx_model, TOK, PROMPTS, **GEN)
    reruns = [bool(r.extra.get("rerun")) for r in reference.engine.records]
    assert any(reruns)
    assert [bool(r.extra.get("rerun")) for r in onnx_model.engine.records] == reruns
    assert torch.equal(got.sequences, want.sequences)


def test_es_dllm_eligible_reaches_the_loop(es_export):
    """Rows that skipped a layer come back not eligible, so the loop never commits them."""
    onnx_model = load_onnx(es_export.path, threads=1, tokenizer=TOK)
    seen = []
    step = onnx_model.engine.step

    def recording(*args, **kwargs):
        out = step(*args, **kwargs)
        seen.append(out.eligible)
        return out

    onnx_model.engine.step = recording
    dyllm_fx.generate(onnx_model, TOK, es_export.prompts, **es_export.gen)
    # every step reports eligibility (the delayed-EOS rule may hold a row back at any step)
    restricted = [e for e in seen if not bool(e.all())]
    assert restricted and len(restricted) < len(seen)
    assert bool(seen[0].all())  # the first (full) step ran every row and delayed no EOS here


def test_tau_is_an_input_no_reexport(dyllm_export):
    """Another tau runs on the same file and gives the engine's tokens for that tau, also where
    it reaches capacities the calibration run did not (the branch takes its sizes as inputs)."""
    model = dyllm_export.model
    unlisted = set()
    for tau in (0.9, 0.999):
        reference = dyllm_fx.transform(model, policy="dyllm", tau=tau)
        with record_plan_keys(reference) as keys:
            want = dyllm_fx.generate(reference, TOK, PROMPTS, **GEN)
        unlisted |= set(keys) - set(dyllm_export.keys)
        onnx_model = load_onnx(dyllm_export.path, threads=1, tokenizer=TOK, policy_args={"tau": tau})
        assert onnx_model.policy.tau == tau
        got = dyllm_fx.generate(onnx_model, TOK, PROMPTS, **GEN)
        assert torch.equal(got.sequences, want.sequences)
    assert unlisted, "no tau reached a key the calibration run did not: this test checks nothing new"


def test_state_stays_in_onnxruntime(dyllm_export):
    onnx_model = load_onnx(dyllm_export.path, threads=1, tokenizer=TOK)
    dyllm_fx.generate(onnx_model, TOK, PROMPTS, **GEN)
    state = onnx_model.engine.runner.state
    assert state and all(isinstance(v, ort.OrtValue) for v in state)
    assert len(state) == len(onnx_model.info.state)


def test_a_second_generation_matches_a_second_engine_generation(dyllm_export):
    """State kept between generations as the engine keeps its buffers: the same tokens again,
    also for a batch of another size (the state is reallocated)."""
    onnx_model = load_onnx(dyllm_export.path, threads=1, tokenizer=TOK)
    reference = dyllm_fx.transform(dyllm_export.model, policy="dyllm")
    for prompts in (PROMPTS, PROMPTS[::-1], PROMPTS[:1]):
        want = dyllm_fx.generate(reference, TOK, prompts, **GEN)
        try:
            got = dyllm_fx.generate(onnx_model, TOK, prompts, **GEN)
        except ExportedPlanMissing:
            continue
        assert torch.equal(got.sequences, want.sequences)


# --- what the runner refuses ----------------------------------------------------------------


def test_runner_refuses_what_the_graph_cannot_run(dyllm_export):
    path = dyllm_export.path
    with pytest.raises(ExportError, match="exported for policy 'dyllm' and cannot run 'es_dllm'"):
        load_onnx(path, policy="es_dllm")
    with pytest.raises(ExportError, match=r"capacity=8 \(exported with 'auto'\).*only \['tau'\] can change"):
        load_onnx(path, policy=make_policy("dyllm", capacity=8))
    fixed = r"every_row=True \(exported with False\).*only \['tau'\] can change"
    with pytest.raises(ExportError, match=fixed):
        load_onnx(path, policy_args={"every_row": True})
    onnx_model = load_onnx(path, threads=1, tokenizer=TOK)
    with pytest.raises(
        ExportedPlanMissing, match="exported for gen_length=16, block_length=8.*--gen-length 16"
    ):
        dyllm_fx.generate(onnx_model, TOK, PROMPTS, gen_length=32, block_length=8, steps=32, progress=False)
    with pytest.raises(ExportedPlanMissing, match="max_seq=40"):
        dyllm_fx.generate(onnx_model, TOK, ["kv:" + "a1," * 10 + "?a="], **GEN)


def test_a_key_the_file_lacks_is_named(llada, tmp_path):
    fast = dyllm_fx.transform(llada, policy="dual_cache+dyllm")
    path = to_onnx(fast, tmp_path / "one.onnx", keys=[("full",)], **LAYOUT)
    onnx_model = load_onnx(path, threads=1, tokenizer=TOK)
    with pytest.raises(ExportedPlanMissing, match=r"no branch for plan key \('refresh', 8\)"):
        dyllm_fx.generate(onnx_model, TOK, PROMPTS, **GEN)


def test_custom_policy_is_refused(llada, tmp_path):
    from dyllm_fx.runtime.policies import Policy

    class Custom(Policy):
        name = "custom"

    fast = dyllm_fx.transform(llada, policy=Custom())
    with pytest.raises(ExportError, match="'custom'.*cannot be exported.*layer_uniform = True"):
        to_onnx(fast, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


# --- the CLI, on a tiny Dream (grouped-query attention, shifted logits) ----------------------


def test_cli_export_and_generate_dream(tmp_path, capsys):
    folder = write_model(_sharpen(tiny_dream(seed=5, num_hidden_layers=2)), tmp_path / "dream")
    out = tmp_path / "step.onnx"
    assert (
        main(
            [
                "export",
                "--onnx",
                str(out),
                "--model",
                str(folder),
                "--policy",
                "dual_cache+dyllm",
                "--policy-arg",
                "tau=0.99",
                "--gen-length",
                "16",
                "--block-length",
                "8",
            ]
        )
        == 0
    )
    assert "3 step graphs" in capsys.readouterr().out  # full, the block's warm-up refresh, sparse
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    assert {n.domain for n in _walk(proto.graph)} <= {""}
    prompts = PROMPTS
    model, _ = dyllm_fx.load(str(folder))
    want = dyllm_fx.generate(
        dyllm_fx.transform(model, policy="dual_cache+dyllm", tau=0.99), TOK, prompts, **GEN
    )
    got = dyllm_fx.generate(load_onnx(out, threads=1), TOK, prompts, **GEN)
    assert torch.equal(got.sequences, want.sequences)
    argv = ["generate", "--onnx", str(out), "--gen-length", "16", "--block-length", "8", "--json", *prompts]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert [o["text"] for o in report["outputs"]] == dyllm_fx.generate(
        dyllm_fx.transform(model, policy="dual_cache+dyllm", tau=0.99),
        TOK,
        prompts,
        gen_length=16,
        block_length=8,
    ).texts
    assert report["policy"] == "dual_cache+dyllm"
    assert (
        main(
            [
                "generate",
                "--onnx",
                str(out),
                "--policy-arg",
                "tau=0.95",
                "--gen-length",
                "16",
                "--block-length",
                "8",
                *prompts,
            ]
        )
        == 0
    )


def test_cli_export_errors_are_one_line(tmp_path, capsys):
    assert (
        main(["export", "--onnx", str(tmp_path / "x.onnx"), "--policy", "dyllm", "--policy-arg", "tau=2"])
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and "tau" in err
    assert (
        main(
            [
                "export",
                "--onnx",
                str(tmp_path / "x.onnx"),
                "--policy",
                "dyllm",
                "--gen-length",
                "16",
                "--block-length",
                "5",
            ]
        )
        == 2
    )
    assert "block_length=5 must divide gen_length=16" in capsys.readouterr().err


# --- the plan-key lists against real generations (no export) --------------------------------

CALIBRATIONS = [
    ("dyllm", {}, "llada", dict(gen_length=16, block_length=8, steps=16)),
    (
        "dyllm",
        {"cached_softmax_stats": True, "refresh_interval": 5},
        "llada",
        dict(gen_length=16, block_length=8, steps=8),
    ),
    ("dual_cache+dyllm", {"refresh_interval": 3}, "dream", dict(gen_length=16, block_length=8, steps=16)),
    ("prefix_cache+dyllm", {}, "llada", dict(gen_length=24, block_length=8, threshold=0.5)),
    ("es_dllm", {}, "llada", dict(gen_length=16, block_length=8, steps=16)),
    ("es_dllm", {}, "dream", dict(gen_length=16, block_length=8, steps=8)),
    (
        "es_dllm",
        {"variation": "value", "block_update_freq": 4},
        "llada",
        dict(gen_length=24, block_length=8, threshold=0.6),
    ),
    ("dual_cache+es_dllm", {}, "llada", dict(gen_length=16, block_length=8, steps=16)),
    ("dllm_cache", {"response_interval": 3}, "llada", dict(gen_length=16, block_length=8, steps=16)),
    ("prefix_cache+dllm_cache", {}, "dream", dict(gen_length=16, block_length=4, steps=8)),
]


@pytest.mark.parametrize(
    "name, cfg, family, gen", CALIBRATIONS, ids=[f"{c[0]}-{i}" for i, c in enumerate(CALIBRATIONS)]
)
def test_plan_keys_cover_what_generations_reach(name, cfg, family, gen):
    model = tiny_llada(seed=3, n_layers=2) if family == "llada" else tiny_dream(seed=4, num_hidden_layers=2)
    fast = dyllm_fx.transform(model, policy=name, **cfg)
    prompt_sets = [PROMPTS, ["kv:a1,b2,c3,d4?cd=", "rev:ab=", "shift:xyz="], ["a="]]
    reached = set()
    lengths = set()
    with record_plan_keys(fast) as keys:
        for prompts in prompt_sets:
            out = dyllm_fx.generate(fast, TOK, prompts, progress=False, **gen)
            lengths.add(out.sequences.shape[1])
    reached = set(keys)
    layout = Layout(
        gen["gen_length"], gen["block_length"], gen.get("steps"), "threshold" in gen, max(lengths) + 3
    )
    listed = {k.key for k in plan_keys(fast.policy, layout.check(None), 2, model.diffusion.logits_shift)}
    assert reached <= listed, sorted(reached - listed, key=str)
    assert len(listed) <= 40


def test_graph_keys_tie_sizes_to_the_sequence():
    full = SparseKey(SEQ, SEQ, "exact", False, SEQ)
    assert graph_key(SparseKey(30, 30, "exact", False, 30), 30) == full
    assert graph_key(SparseKey(30, 16, "exact", False, 4), 30) == SparseKey(SEQ, 16, "exact", False, 4)
    assert graph_key(SparseKey(16, 8, "exact", False, 8), 30) == SparseKey(16, 8, "exact", False, 8)
    assert graph_key(SparseKey(16, 8, "exact", False, None), 30).mlp_capacity is None  # per sequence
    # a skip layer's index is not a size, even when it equals the length
    assert graph_key(SkipKey(16, ((2, 3),)), 2) == SkipKey(16, ((2, 3),))
    assert bind(AdaptiveKey(SEQ, 8), 21) == AdaptiveKey(21, 8)


def test_keys_that_differ_only_in_sizes_share_a_branch():
    keys = [
        SparseKey(SEQ, SEQ, "exact", False, None),
        SparseKey(SEQ, 8, "exact", False, None),
        SparseKey(16, 8, "exact", False, None),
        SparseKey(16, 8, "exact", False, 4),  # a batch-wide MLP capacity: another step
        SparseKey(16, 8, "cached", False, None),  # another statistics mode: another step
        SkipKey(16, ((2, 3),)),
        SkipKey(SEQ, ((2, 5),)),
        SkipKey(16, ((1, 3),)),  # another skip layer: another step
    ]
    groups = branches([KeyRange(k, 20, 40) for k in keys])
    assert [b.key for b in groups] == [
        SparseKey(ANY, ANY, "exact", False, None),
        SparseKey(ANY, ANY, "exact", False, ANY),
        SparseKey(ANY, ANY, "cached", False, None),
        SkipKey(ANY, ((2, ANY),)),
        SkipKey(ANY, ((1, ANY),)),
    ]
    assert [len(b.members) for b in groups] == [3, 1, 1, 2, 1]
    assert size_count(b.key for b in groups) == 3
    # the sizes a branch takes as inputs, in order, and back
    key = bind(SkipKey(SEQ, ((2, 5),)), 30)
    assert branch_sizes(branch_key(key), key) == [5, 30]  # SkipKey.map_sizes' order: kept, width
    assert with_sizes(branch_key(key), [5, 30, 99]) == key  # sizes beyond the key's are ignored
    # one branch per key: its sizes stay fixed and it takes none as inputs
    fixed = branches([KeyRange(k, 20, 40) for k in keys], by_shape=False)
    assert [b.key for b in fixed] == keys and size_count(b.key for b in fixed) == 0
    assert with_sizes(keys[1], [30]) == keys[1]


def test_plan_keys_refuse_a_layout_too_wide():
    with pytest.raises(ValueError, match="more than 64 step shapes.*scope='all'"):
        plan_keys(make_policy("dllm_cache", scope="all"), Layout(16, 8, max_seq=400).check(None), 2, 0)


def test_deduplicate_merges_equal_initializers_only():
    """Equal weights in several branches are stored once; a scalar and a [1] tensor of the same
    bytes, or the same bytes in another dtype, stay apart (Concat needs the rank)."""
    import onnx_ir as ir

    from dyllm_fx.export.onnx_plans import deduplicate

    w = torch.randn(40, 30).t()  # not contiguous, as the exporter's folded transposes are
    values = {
        "w": ir.tensor(w),
        "w_copy": ir.tensor(w.contiguous().clone()),
        "w_other": ir.tensor(w + 1),
        "scalar": ir.tensor(np.array(1, dtype=np.int64)),
        "one": ir.tensor(np.array([1], dtype=np.int64)),
        "one_copy": ir.tensor(np.array([1], dtype=np.int64)),
        "one_i32": ir.tensor(np.array([1, 0], dtype=np.int32)),
    }
    inits = [ir.Value(name=n, const_value=t) for n, t in values.items()]
    node = ir.Node("", "Identity", [inits[1]], name="use")
    graph = ir.Graph([], [node.outputs[0]], nodes=[node], initializers=inits, opset_imports={"": 18})
    assert deduplicate(graph) == 2
    assert sorted(graph.initializers) == ["one", "one_i32", "scalar", "w", "w_other"]
    assert node.inputs[0].name == "w"  # the user now reads the kept copy
