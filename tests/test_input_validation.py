"""Bad input is rejected with an error that says what is wrong and how to fix it.

Cases already covered elsewhere are not repeated here: unknown architecture / missing /
unexpected / mis-shaped keys one at a time (test_loading.py), block_length not dividing
gen_length and steps not a multiple of the block count at the schedule level, an empty prompt
list, a window overflow on the untransformed model and a threshold outside (0, 1]
(test_samplers.py), a model without attention or residual (test_pass_find_blocks.py, on the
pass itself), unknown policies and bad policy parameters (test_transform.py).
"""

from __future__ import annotations

import importlib
import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import dyllm_fx
from dyllm_fx.models import CheckpointError, LLaDAModelLM
from dyllm_fx.passes.find_blocks import BlockMatchError
from dyllm_fx.runtime.policies import POLICIES
from tiny_checkpoints import tiny_dream, tiny_llada, tiny_llada_config, tiny_tokenizer

TOK = tiny_tokenizer()
KW = dict(progress=False, stop_at_eos=False)


@pytest.fixture(scope="module")
def llada():
    return tiny_llada(seed=0)


@pytest.fixture(scope="module")
def dense_llada(llada):
    return dyllm_fx.transform(llada)


# --------------------------------------------------------------------------- architecture


@pytest.mark.parametrize(
    "fields",
    [
        {"model_type": None, "architectures": None},
        {"model_type": "mistral", "architectures": ["MistralForCausalLM"]},
    ],
    ids=["no-fields", "mistral"],
)
def test_unknown_architecture_names_the_way_out(tiny_llada_dir, fields):
    path = tiny_llada_dir / "config.json"
    cfg = json.loads(path.read_text())
    for key, value in fields.items():
        cfg.pop(key, None) if value is None else cfg.__setitem__(key, value)
    path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unknown architecture") as err:
        dyllm_fx.load(tiny_llada_dir, device="cpu")
    msg = str(err.value)
    assert "model_type 'llada'" in msg and "model_type 'dream'" in msg  # what it can load
    assert "dyllm_fx.transform()" in msg  # and the way out for anything else
    if fields["model_type"]:
        assert "mistral" in msg and "MistralForCausalLM" in msg


def test_all_checkpoint_key_problems_in_one_message(tiny_llada_dir):
    """One load reports every problem at once (each key named), not one per attempt."""
    path = tiny_llada_dir / "model.safetensors"
    state = load_file(str(path))
    missing = sorted(k for k in state if k.endswith("ff_out.weight") and ".blocks." in k)  # 2 layers
    for key in missing:
        state.pop(key)
    state["model.transformer.blocks.0.extra.weight"] = torch.zeros(3)
    state["model.transformer.ln_f.weight"] = torch.ones(31)  # model wants (32,)
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        dyllm_fx.load(tiny_llada_dir, device="cpu")
    msg = str(err.value)
    for key in (*missing, "model.transformer.blocks.0.extra.weight", "model.transformer.ln_f.weight"):
        assert key in msg
    assert "missing keys" in msg and "unexpected keys" in msg and "mis-shaped keys" in msg
    assert "(31,)" in msg and "(32,)" in msg
    assert "config.json belongs to these weights" in msg  # the fix


def test_many_missing_keys_are_summarised(tiny_llada_dir):
    path = tiny_llada_dir / "model.safetensors"
    state = load_file(str(path))
    dropped = sorted(k for k in state if ".blocks." in k)
    save_file({k: v for k, v in state.items() if k not in dropped}, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        dyllm_fx.load(tiny_llada_dir, device="cpu")
    msg = str(err.value)
    assert dropped[0] in msg and f"({len(dropped) - 8} more)" in msg  # eight named, the rest counted
    assert len(msg) < 2000


# --------------------------------------------------------------------------- blocks the passes cannot match


def _heads(y, b, t):
    return y.view(b, t, 2, 8).transpose(1, 2)


class _Blocks(nn.Module):
    """Two attention + MLP blocks over a 16-wide residual stream; ``forward`` sets the wiring."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        names = ("q", "k", "v", "o", "up", "down")
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    n: nn.Linear(16, 32) if n == "up" else nn.Linear(32 if n == "down" else 16, 16)
                    for n in names
                }
            )
            for _ in range(2)
        )
        self.head = nn.Linear(16, 20)

    def attn(self, blk, x):
        b, t, _ = x.shape
        ctx = F.scaled_dot_product_attention(
            _heads(blk["q"](x), b, t), _heads(blk["k"](x), b, t), _heads(blk["v"](x), b, t)
        )
        return blk["o"](ctx.transpose(1, 2).reshape(b, t, 16))

    def mlp(self, blk, x):
        return blk["down"](F.gelu(blk["up"](x)))


class ParallelBlocks(_Blocks):
    """GPT-J style: x + attn(x) + mlp(x), both branches reading the block input."""

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        x = self.emb(input_ids)
        for blk in self.blocks:
            x = x + self.attn(blk, x) + self.mlp(blk, x)
        return self.head(x)


class ScaledResidual(_Blocks):
    """Sequential blocks, but the stream is rescaled between blocks (a row-wise op: supported)."""

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        x = self.emb(input_ids)
        for blk in self.blocks:
            x = x + self.attn(blk, x)
            x = 0.5 * (x + self.mlp(blk, x))
        return self.head(x)


class MixedResidual(_Blocks):
    """Sequential blocks, but the stream is mixed across positions between blocks."""

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        x = self.emb(input_ids)
        for blk in self.blocks:
            x = x + self.attn(blk, x)
            x = x + self.mlp(blk, x)
            x = x - x.mean(dim=1, keepdim=True)
        return self.head(x)


@pytest.mark.parametrize(
    "model_cls, block, node, what",
    [
        (ParallelBlocks, 0, "scaled_dot_product_attention", "no MLP branch"),
        (MixedResidual, 1, "scaled_dot_product_attention_1", "row-wise ops"),
    ],
)
def test_transform_names_the_block_and_node_it_cannot_match(model_cls, block, node, what):
    torch.manual_seed(0)
    with pytest.raises(BlockMatchError) as err:
        dyllm_fx.transform(model_cls().eval())
    msg = str(err.value)
    assert f"block {block} (attention node '{node}')" in msg
    assert what in msg
    assert "write the model's blocks in that form" in msg  # the fix


def test_row_wise_op_between_blocks_is_recomputed_exactly():
    # A scale between blocks is cut into the next block's input: the dense transform is exact.
    torch.manual_seed(0)
    model = ScaledResidual().eval()
    ids = torch.randint(2, 19, (2, 12))
    with torch.no_grad():
        want = model(ids)
        got = dyllm_fx.transform(model, policy="dense")(ids)
    want = getattr(want, "logits", want)
    got = getattr(got, "logits", got)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- policy parameters


@pytest.mark.skipif(
    "dyllm" not in POLICIES, reason="the DyLLM policy is not registered yet (runtime/policies)"
)
@pytest.mark.parametrize("tau", [1.5, 0.0, -0.1])
def test_dyllm_tau_outside_unit_interval(llada, tau):
    with pytest.raises(ValueError, match="tau") as err:
        dyllm_fx.transform(llada, policy="dyllm", tau=tau)
    assert "(0, 1]" in str(err.value)


@pytest.mark.skipif("es_dllm" not in POLICIES, reason="the ES-dLLM policy is not registered")
def test_es_dllm_skip_layer_beyond_the_model(llada):
    with pytest.raises(ValueError, match=r"skip layer 3 .*2 layers.*skip_layers="):  # 2 layers
        dyllm_fx.transform(llada, policy="es_dllm", skip_layers=(1, 3), keep=(0.5, 0.25))
    fast = dyllm_fx.transform(llada, policy="es_dllm")  # the official depth layout fits any depth
    dyllm_fx.generate(fast, TOK, "ab", gen_length=8, block_length=4, **KW)


# --------------------------------------------------------------------------- generate() arguments


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        (
            dict(gen_length=16, block_length=0, steps=16),
            ValueError,
            r"block_length must be positive .*e\.g\. use block_length=16",
        ),
        (dict(gen_length=16, block_length=-4, steps=16), ValueError, "block_length must be positive"),
        (
            dict(gen_length=16, block_length=6, steps=16),
            ValueError,
            r"block_length=6 must divide gen_length=16; e\.g\. use block_length=4",
        ),
        (
            dict(gen_length=16, block_length=4, steps=6),
            ValueError,
            r"steps=6 must be a positive multiple .*e\.g\. steps=8",
        ),
        (dict(gen_length=16, block_length=4, steps=-4), ValueError, "steps=-4 must be a positive multiple"),
        (
            dict(gen_length=16, block_length=4, steps=8.0),
            TypeError,
            r"steps must be an integer, got 8\.0 .*int\(8\.0\)",
        ),
        (
            dict(gen_length="16", block_length=4, steps=8),
            TypeError,
            "gen_length must be an integer, got '16'",
        ),
        (dict(gen_length=16, block_length=4.5, steps=8), TypeError, "block_length must be an integer"),
        (dict(gen_length=0, block_length=None, steps=4), ValueError, "gen_length must be positive"),
    ],
)
def test_generate_rejects_bad_schedule(llada, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        dyllm_fx.generate(llada, TOK, "ab", **kwargs, **KW)


def test_schedule_accepts_integer_like_numbers(llada):
    import numpy as np

    a = dyllm_fx.generate(
        llada, TOK, "ab", gen_length=np.int64(8), block_length=torch.tensor(4), steps=np.int32(4), **KW
    )
    b = dyllm_fx.generate(llada, TOK, "ab", gen_length=8, block_length=4, steps=4, **KW)
    assert torch.equal(a.sequences, b.sequences)


@pytest.mark.parametrize(
    "prompts, exc, pattern",
    [
        (
            torch.tensor([[5, 6, 7]]),
            TypeError,
            r"prompts must be a string or a list of strings, got a \(1, 3\) tensor",
        ),
        (["ab", 7], TypeError, "a list holding int 7"),
        (["ab", None], TypeError, "list of strings"),
        (["ab", "", "cd", ""], ValueError, r"prompts \[1, 3\] are empty"),
        ((), ValueError, "prompts is empty"),
    ],
    ids=["tensor", "int", "none", "empty-strings", "empty-tuple"],
)
def test_generate_rejects_bad_prompts(llada, prompts, exc, pattern):
    with pytest.raises(exc, match=pattern):
        dyllm_fx.generate(llada, TOK, prompts, gen_length=8, block_length=8, **KW)


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_window_overflow_through_a_transformed_model(arch):
    """The window check reads the spec the transformed model carries (Dream: max_position_embeddings)."""
    model = (
        tiny_llada(0, max_sequence_length=24)
        if arch == "llada"
        else tiny_dream(0, max_position_embeddings=24)
    )
    fast = dyllm_fx.transform(model)
    with pytest.raises(
        ValueError, match=r"prompt \(10 tokens\) \+ gen_length \(16\) = 26 exceeds the model's window of 24"
    ):
        dyllm_fx.generate(fast, TOK, "rev:abcde=", gen_length=16, block_length=8, **KW)
    out = dyllm_fx.generate(fast, TOK, "rev:abcde=", gen_length=8, block_length=8, **KW)  # 18 fits
    assert out.sequences.shape == (1, 18)


# --------------------------------------------------------------------------- dtype and device mixes


def test_generate_rejects_mixed_parameter_dtypes():
    model = tiny_llada(0)
    model.model.transformer.blocks[1].q_proj.double()
    with pytest.raises(ValueError, match="mixes parameter dtypes") as err:
        dyllm_fx.generate(model, TOK, "ab", gen_length=8, block_length=8, **KW)
    msg = str(err.value)
    assert "torch.float64: parameter model.transformer.blocks.1.q_proj.weight" in msg
    assert "model.to(torch.float32)" in msg  # the majority dtype is the suggested fix


def test_generate_rejects_a_partly_loaded_model():
    """A parameter left on the meta device would otherwise run and decode garbage silently."""
    model = tiny_llada(0)
    model.model.transformer.blocks[1].q_proj.to("meta")
    with pytest.raises(ValueError, match="meta device") as err:
        dyllm_fx.generate(model, TOK, "ab", gen_length=8, block_length=8, **KW)
    assert "model.transformer.blocks.1.q_proj.weight" in str(err.value)
    assert "assign=True" in str(err.value)


def test_generate_rejects_a_model_built_on_meta():
    with torch.device("meta"):
        model = LLaDAModelLM(tiny_llada_config(len(TOK))).eval()
    with pytest.raises(ValueError, match=r"\(\+\d+ more\) of LLaDAModelLM are on the meta device"):
        dyllm_fx.generate(model, TOK, "ab", gen_length=8, block_length=8, **KW)


def test_a_float64_model_is_fine():
    """One dtype throughout, even an unusual one, is not an error (the cache follows it)."""
    model = tiny_llada(0).double()
    fast = dyllm_fx.transform(model)
    a = dyllm_fx.generate(model, TOK, ["ab", "abcd"], gen_length=8, block_length=4, **KW)
    b = dyllm_fx.generate(fast, TOK, ["ab", "abcd"], gen_length=8, block_length=4, **KW)
    assert torch.equal(a.sequences, b.sequences)
    assert fast.cache.k[0].dtype == torch.float64


def test_transform_rejects_mixed_parameter_dtypes():
    model = tiny_llada(0)
    model.model.transformer.blocks[0].up_proj.double()
    with pytest.raises(ValueError, match="mixes parameter dtypes"):
        dyllm_fx.transform(model)


def test_transform_rejects_a_model_on_meta():
    with torch.device("meta"):
        model = LLaDAModelLM(tiny_llada_config(len(TOK))).eval()
    with pytest.raises(ValueError, match="meta device"):
        dyllm_fx.transform(model)


def test_transformed_forward_rejects_float_token_ids(dense_llada):
    ids = torch.randint(3, 40, (1, 9))
    with pytest.raises(TypeError, match=r"input_ids .*\.long\(\)"):
        dense_llada(ids.float())


def test_transformed_forward_accepts_int32_ids(dense_llada, llada):
    ids = torch.randint(3, 40, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(dense_llada(ids.int()), llada(ids), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- ONNX files that are not a step
# graph
# test_export_onnx.py covers a text file, a plain ONNX model without metadata and a missing file.


def _onnx_loader():
    try:
        export = importlib.import_module("dyllm_fx.export")
    except ImportError:
        return None
    return getattr(export, "load_onnx", None)


needs_onnx_loader = pytest.mark.skipif(
    _onnx_loader() is None
    or importlib.util.find_spec("onnx") is None
    or importlib.util.find_spec("onnxruntime") is None,
    reason="needs dyllm_fx.export.load_onnx, onnx and onnxruntime",
)

STEP_METADATA = dict(  # a complete, well-formed set of dyllm.* keys for a one-input graph
    format="dyllm-step/2",
    mask_token_id="3",
    eos_token_ids="[1]",
    logits_shift="0",
    policy="dense",
    policy_config="{}",
    n_layers="1",
    hidden_size="4",
    kv_shapes="[[[1, 4], [1, 4]]]",
    hidden_dtype="float32",
    kv_dtype="float32",
    inputs='["x"]',
    outputs='["y"]',
)


def _relu_graph(path, metadata: dict | None):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    if metadata is not None:
        helper.set_model_props(model, {f"dyllm.{k}": v for k, v in metadata.items()})
    onnx.save(model, str(path))
    return path


@needs_onnx_loader
@pytest.mark.parametrize(
    "changes, pattern",
    [
        (
            {"format": "dyllm-step/0"},
            r"format 'dyllm-step/0'; this dyllm-fx reads 'dyllm-step/2'\. Export it again",
        ),
        (
            {"inputs": '["input_ids"]'},
            r"its inputs \['x'\] differ from those its metadata lists \['input_ids'\]; export it again",
        ),
    ],
    ids=["other-format-version", "inputs-differ-from-metadata"],
)
def test_onnx_step_graph_metadata_that_does_not_fit(tmp_path, changes, pattern):
    path = _relu_graph(tmp_path / "step.onnx", {**STEP_METADATA, **changes})
    with pytest.raises(ValueError, match=pattern) as err:
        _onnx_loader()(path)
    assert str(path) in str(err.value)


@needs_onnx_loader
def test_onnx_empty_file(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="is not a dyllm step graph"):
        _onnx_loader()(path)


@needs_onnx_loader
@pytest.mark.parametrize("key, value", [("mask_token_id", "abc"), ("kv_shapes", "not json")])
def test_onnx_malformed_metadata_value(tmp_path, key, value):
    path = _relu_graph(tmp_path / "step.onnx", {**STEP_METADATA, key: value})
    with pytest.raises(ValueError, match=rf"{path.name}.*{key}"):
        _onnx_loader()(path)
