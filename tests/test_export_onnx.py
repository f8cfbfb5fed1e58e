"""ONNX export of the embedded model's step, run with onnxruntime against the torch engine.

Two exports per module (about 10-30 s each on a 2-core CPU): ``dense`` through the Python API
and ``dual_cache`` through ``dyllm export --onnx``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import dyllm_fx  # noqa: E402
from dyllm_fx.cli.main import main  # noqa: E402
from dyllm_fx.eval.synthetic_tasks import held_out_set  # noqa: E402
from dyllm_fx.export import ExportableStep, ExportError, NotAStepGraphError, load_onnx, to_onnx  # noqa: E402
from dyllm_fx.export.metadata import FORMAT  # noqa: E402
from dyllm_fx.export.step_module import cache_shapes  # noqa: E402
from dyllm_fx.models.layers import default_position_ids  # noqa: E402
from dyllm_fx.runtime.policies import Policy  # noqa: E402

# Slow (`-m "not slow"` leaves it out): the ONNX fixtures: exports and runs the embedded model through
# onnxruntime.
pytestmark = pytest.mark.slow

# Measured on a 2-core x86 CPU, float32: max |onnxruntime - torch| on the logits (magnitude up
# to ~24) is 1e-5 at L = 40 and 1.2e-4 at L = 103 for a full step, 3e-5 for a 32-row sparse
# step: float32 summation order only. The bound leaves a 4x margin over the worst case.
LOGITS_ATOL = 5e-4
POLICIES = ("dense", "dual_cache")


def _prompts() -> list[str]:
    # Two shift prompts, a longer lookup prompt and a shorter add prompt: a left-padded batch.
    examples = held_out_set(2, tasks=("shift",)) + held_out_set(1, tasks=("lookup", "add"))
    return [e.prompt for e in examples]


@pytest.fixture(scope="module")
def embedded():
    return dyllm_fx.load("default", device="cpu")


@pytest.fixture(scope="module")
def exported(embedded, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    model, _ = embedded
    paths = {
        "dense": to_onnx(
            dyllm_fx.transform(model, policy="dense"), folder / "dense.onnx", model_path="default"
        )
    }
    assert main(["export", "--onnx", str(folder / "dual_cache.onnx"), "--policy", "dual_cache"]) == 0
    paths["dual_cache"] = folder / "dual_cache.onnx"
    return paths


def _session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("policy", POLICIES)
def test_graph_is_standard_onnx(embedded, exported, policy):
    n_layers = len(embedded[0].layers)
    proto = onnx.load(str(exported[policy]))
    onnx.checker.check_model(proto, full_check=True)
    domains = {node.domain for node in proto.graph.node} | {f.domain for f in proto.functions}
    assert domains <= {"", "ai.onnx"}, f"non-standard domains: {domains}"
    assert not any("dyllm" in node.op_type for node in proto.graph.node)
    assert {o.domain: o.version for o in proto.opset_import}.get("", 0) >= 18
    dims = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input
    }
    assert dims["input_ids"] == ["batch", "seq"] and dims["rows"] == ["batch", "active"]
    assert dims["logit_positions"] == ["batch", "positions"] and dims[f"k_cache_{n_layers - 1}"] == [
        "batch",
        4,
        "seq",
        32,
    ]
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["dyllm.format"] == FORMAT and props["dyllm.policy"] == policy
    assert props["dyllm.n_layers"] == str(n_layers) and props["dyllm.model_path"] == "default"
    assert props["dyllm.mask_token_id"] == "1" and props["dyllm.logits_shift"] == "0"


def test_step_logits_match_torch(embedded, exported):
    """A cold full step, then a sparse step on 8 rows, through onnxruntime and the eager step."""
    model, _ = embedded
    fast = dyllm_fx.transform(model, policy="dense")
    step = ExportableStep(fast.program).eval()
    session = _session(exported["dense"])
    names = [i.name for i in session.get_inputs()]
    bsz, seq_len = 3, 40
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 44, (bsz, seq_len), generator=gen)
    mask = torch.ones(bsz, seq_len, dtype=torch.long)
    mask[0, :6] = 0  # left padding
    pos = default_position_ids(ids, mask)
    caches = [torch.zeros(s) for s in cache_shapes(fast.program, bsz, seq_len)]
    all_rows = torch.arange(seq_len).expand(bsz, -1).contiguous()

    def both(inputs):
        with torch.no_grad():
            ref = step(*inputs)
        got = session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})
        return ref, [torch.from_numpy(g) for g in got]

    ref, got = both((ids, mask, pos, all_rows, all_rows, *caches))
    with torch.no_grad():
        vanilla = model(ids, attention_mask=mask, position_ids=pos)
    vanilla = getattr(vanilla, "logits", vanilla)
    keep = mask.bool()  # padded query rows are not compared (their output is never read)
    assert (ref[0] - vanilla)[keep].abs().max() < 1e-5
    assert (got[0] - ref[0])[keep].abs().max() < LOGITS_ATOL
    for g, r in zip(got[1:], ref[1:]):
        torch.testing.assert_close(g, r, atol=1e-3, rtol=1e-4)

    ids2 = ids.clone()
    ids2[:, 24:28] = 7
    rows = torch.arange(22, 30).expand(bsz, -1).contiguous()
    ref2, got2 = both((ids2, mask, pos, rows, rows[:, :5].contiguous(), *ref[1:]))
    assert (got2[0] - ref2[0]).abs().max() < LOGITS_ATOL


@pytest.mark.parametrize("policy", POLICIES)
def test_generation_matches_engine(embedded, exported, policy):
    model, tokenizer = embedded
    prompts = _prompts()
    expected = dyllm_fx.generate(dyllm_fx.transform(model, policy=policy), tokenizer, prompts)
    onnx_model = load_onnx(exported[policy], threads=1)
    assert onnx_model.policy.name == policy
    got = dyllm_fx.generate(onnx_model, onnx_model.tokenizer, prompts)
    assert torch.equal(got.sequences, expected.sequences)
    assert got.texts[:2] == [e.answer for e in held_out_set(2, tasks=("shift",))]
    rows = [r.active[0] for r in onnx_model.engine.records]
    if policy == "dual_cache":  # a refresh of every row at each block start, the block otherwise
        assert rows[0] == got.sequences.shape[1] and rows[1] == 32
    else:
        assert set(rows) == {got.sequences.shape[1]}


def test_policy_override_and_threshold(embedded, exported):
    """The graph takes its rows as an input: any layer-uniform policy runs on any export."""
    model, tokenizer = embedded
    prompts = _prompts()[:2]
    expected = dyllm_fx.generate(
        dyllm_fx.transform(model, policy="prefix_cache"), tokenizer, prompts, threshold=0.9
    )
    onnx_model = load_onnx(exported["dense"], policy="prefix_cache", threads=1)
    got = dyllm_fx.generate(onnx_model, onnx_model.tokenizer, prompts, threshold=0.9)
    assert torch.equal(got.sequences, expected.sequences)
    assert got.stats.nfe < 64


def test_cli_generate_onnx(exported, capsys):
    prompt, answer = held_out_set(1, tasks=("shift",))[0].prompt, held_out_set(1, tasks=("shift",))[0].answer
    assert main(["generate", "--onnx", str(exported["dual_cache"]), prompt]) == 0
    assert capsys.readouterr().out.strip() == answer
    # a row policy on a layer-uniform file: the message names the export that runs it
    assert main(["generate", "--onnx", str(exported["dual_cache"]), "--policy", "dyllm", prompt]) == 2
    assert "dyllm export --onnx FILE --policy dyllm" in capsys.readouterr().err
    assert main(["generate", "--onnx", str(exported["dual_cache"]), "--policy-arg", "tau=0.9", prompt]) == 2
    assert "layer-uniform step graph" in capsys.readouterr().err


class _PerLayer(Policy):
    """Stands for DyLLM / ES-dLLM: rows that differ between layers."""

    name = "per_layer"

    def rows(self, layer, state):
        return torch.arange(layer, state.input_ids.shape[1]).expand(state.input_ids.shape[0], -1)


def test_export_rejects_what_it_cannot_express(embedded, tmp_path):
    model, _ = embedded
    with pytest.raises(ExportError, match="call dyllm_fx.transform"):
        to_onnx(model, tmp_path / "x.onnx")
    fast = dyllm_fx.transform(model, policy=_PerLayer())
    with pytest.raises(
        ExportError, match="cannot be exported.*layer-uniform \\(dense, fixed, prefix_cache, dual_cache"
    ):
        to_onnx(fast, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_not_a_step_graph(tmp_path, capsys):
    text = tmp_path / "notes.onnx"
    text.write_text("not a model")
    with pytest.raises(NotAStepGraphError, match="is not a dyllm step graph.*dyllm export --onnx"):
        load_onnx(text)
    # A valid ONNX model without the metadata: named as such, with the missing keys.
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    plain = tmp_path / "identity.onnx"
    # IR version 10, as torch's exporter writes: older onnxruntime builds reject newer IR versions.
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)], ir_version=10)
    onnx.save(proto, str(plain))
    with pytest.raises(
        NotAStepGraphError, match=r"identity.onnx is not a dyllm step graph \(missing metadata dyllm.format"
    ):
        load_onnx(plain)
    assert main(["generate", "--onnx", str(plain), "shift:abc="]) == 2
    err = capsys.readouterr().err
    assert "is not a dyllm step graph" in err and "`dyllm export --onnx`" in err and "Traceback" not in err
    with pytest.raises(FileNotFoundError, match="dyllm export --onnx"):
        load_onnx(tmp_path / "missing.onnx")


def test_ort_values_stay_in_the_backend(exported):
    """Caches come back as OrtValues and feed the next step without a host copy."""
    onnx_model = load_onnx(exported["dense"], threads=1)
    assert onnx_model.backend.device == "cpu"
    cache = onnx_model.backend.zeros((1, 4, 8, 32), "float32")
    assert isinstance(cache, ort.OrtValue) and np.all(cache.numpy() == 0)
    with pytest.raises(ValueError, match="float32 or float16"):
        onnx_model.backend.zeros((1, 2), "bfloat16")


# --- GPU paths: run where CUDA (and onnxruntime-gpu) are present ------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_export_from_a_cuda_model(embedded, tmp_path):
    """Tracing on the GPU gives the same graph: decoded on onnxruntime, the CPU engine's tokens."""
    _, tokenizer = embedded
    cpu_model, _ = embedded
    gpu_model, _ = dyllm_fx.load("default", device="cuda", dtype=torch.float32)
    path = to_onnx(
        dyllm_fx.transform(gpu_model, policy="dual_cache"), tmp_path / "gpu.onnx", model_path="default"
    )
    onnx_model = load_onnx(path)
    prompts = _prompts()
    expected = dyllm_fx.generate(dyllm_fx.transform(cpu_model, policy="dual_cache"), tokenizer, prompts)
    got = dyllm_fx.generate(onnx_model, onnx_model.tokenizer, prompts)
    assert got.texts[:2] == expected.texts[:2] == [e.answer for e in held_out_set(2, tasks=("shift",))]


@pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(),
    reason="needs onnxruntime-gpu and a CUDA GPU",
)
def test_onnxruntime_cuda_provider_keeps_caches_on_the_gpu(embedded, exported):
    model, tokenizer = embedded
    onnx_model = load_onnx(exported["dual_cache"], device="cuda")
    assert onnx_model.backend.device == "cuda"
    prompts = _prompts()
    expected = dyllm_fx.generate(dyllm_fx.transform(model, policy="dual_cache"), tokenizer, prompts)
    got = dyllm_fx.generate(onnx_model, onnx_model.tokenizer, prompts)
    assert got.texts[:2] == expected.texts[:2]
