"""The front door: what a new user meets first. Each of its promises has a test here (or, for
the README and docs/, in test_readme.py): a clear error raised before the expensive work, a
warning, or input that now works.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dyllm_fx
from dyllm_fx.cli.main import build_parser, main
from dyllm_fx.errors import EmptyResponseWarning, UnknownCharactersWarning, UsageError
from dyllm_fx.models import CheckpointError
from dyllm_fx.models.spec import DiffusionSpec
from dyllm_fx.passes.check_bidirectional import CausalAttentionError, is_causal_mask
from dyllm_fx.transform import TransformedModel
from tiny_checkpoints import tiny_dream, tiny_llada, tiny_tokenizer

TOK = tiny_tokenizer()
KW = dict(gen_length=8, block_length=8, progress=False)


@pytest.fixture(scope="module")
def llada():
    return tiny_llada(seed=0)


def _hf_causal_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _no_load(*args, **kwargs):
    raise AssertionError("the weights must not load before the input is checked")


# --------------------------------------------------------------------------- causal models


def test_causal_transformers_model_is_refused_by_transform():
    hf = _hf_causal_llama()
    hf.diffusion = DiffusionSpec(mask_token_id=1)  # what the old "no diffusion spec" message suggested
    with pytest.raises(CausalAttentionError, match=r"causal mask.*dyllm_fx\.models\.hf\.bidirectional"):
        dyllm_fx.transform(hf)


def test_causal_transformers_model_is_refused_by_generate():
    hf = _hf_causal_llama()
    hf.diffusion = DiffusionSpec(mask_token_id=1)
    with pytest.raises(CausalAttentionError, match=r"is_causal=True.*hf\.bidirectional"):
        dyllm_fx.generate(hf, TOK, "12", **KW)


def test_the_bidirectional_wrapper_passes_the_check():
    from dyllm_fx.models.hf import bidirectional

    fast = dyllm_fx.transform(bidirectional(_hf_causal_llama(), mask_token_id=1))
    assert isinstance(fast, TransformedModel)


def test_missing_spec_message_points_to_the_bidirectional_wrapper():
    with pytest.raises(
        TypeError, match=r"dyllm_fx\.models\.hf\.bidirectional\(model, mask_token_id=\.\.\.\)"
    ):
        dyllm_fx.generate(nn.Linear(2, 2), TOK, "12", **KW)


class _MaskedBlockLM(nn.Module):
    """One decoder block whose attention mask is built in the forward: causal (tril) or not."""

    def __init__(self, causal: bool, flag: bool = False):
        super().__init__()
        self.causal, self.flag = causal, flag
        self.emb = nn.Embedding(20, 16)
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16, bias=False) for _ in range(4))
        self.up, self.down = nn.Linear(16, 32, bias=False), nn.Linear(32, 16, bias=False)
        self.head = nn.Linear(16, 20, bias=False)
        self.diffusion = DiffusionSpec(mask_token_id=1)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        x = self.emb(input_ids)
        n = input_ids.shape[1]
        heads = lambda t: t.view(t.shape[0], n, 2, 8).transpose(1, 2)  # noqa: E731
        if self.flag:
            ctx = F.scaled_dot_product_attention(
                heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), is_causal=True
            )
        else:
            keep = torch.ones(n, n, dtype=torch.bool, device=x.device)
            mask = keep.tril() if self.causal else keep
            ctx = F.scaled_dot_product_attention(
                heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), attn_mask=mask
            )
        h = x + self.o(ctx.transpose(1, 2).reshape(x.shape))
        h = h + self.down(F.silu(self.up(h)))
        return self.head(h)


@pytest.mark.parametrize("causal,flag", [(True, False), (False, True)], ids=["tril-mask", "is_causal"])
def test_causal_attention_detected_from_the_graph(causal, flag):
    with pytest.raises(CausalAttentionError, match="causal"):
        dyllm_fx.transform(_MaskedBlockLM(causal, flag).eval())


def test_a_full_explicit_mask_is_fine():
    assert isinstance(dyllm_fx.transform(_MaskedBlockLM(causal=False).eval()), TransformedModel)


def test_causal_mask_recognition():
    n = 5
    tril = torch.ones(n, n, dtype=torch.bool).tril()
    assert is_causal_mask(tril) and is_causal_mask(tril[None, None].expand(2, 1, n, n))
    additive = torch.zeros(n, n).masked_fill(~tril, torch.finfo(torch.float32).min)
    assert is_causal_mask(additive)
    assert not is_causal_mask(torch.ones(n, n, dtype=torch.bool))  # bidirectional
    assert not is_causal_mask(torch.ones(2, 1, 1, n, dtype=torch.bool))  # key padding only
    padded = torch.ones(n, n, dtype=torch.bool)
    padded[:, 0] = False  # left padding hides key 0 from every query: not causal
    assert not is_causal_mask(padded)


def test_dynamo_backend_refuses_a_causal_model():
    model = _MaskedBlockLM(causal=True).eval()
    compiled = torch.compile(model, backend="dyllm", options={"compile_pieces": False})
    ids = torch.randint(2, 20, (1, 6))
    with pytest.raises(Exception, match="causal"):
        compiled(ids, attention_mask=torch.ones_like(ids))
    torch._dynamo.reset()


# --------------------------------------------------------------------------- prompts and windows


def test_unknown_characters_warn_with_the_alphabet(llada):
    with pytest.warns(UnknownCharactersWarning, match=r"' ', '\.'.*alphabet is '0123456789abc"):
        dyllm_fx.generate(llada, TOK, ["lookup prompt...", "12+3="], **KW)


def test_known_characters_do_not_warn(llada):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnknownCharactersWarning)
        dyllm_fx.generate(llada, TOK, ["kv:a1,b2?ab="], **KW)


def _with_training_window(folder, window: int):
    (folder / "training.json").write_text(json.dumps({"stages": [{"args": {"gen_length": window}}]}))
    return folder


def test_gen_length_other_than_the_trained_window_warns(tiny_llada_dir):
    model, tok = dyllm_fx.load(_with_training_window(tiny_llada_dir, 8), device="cpu")
    assert model.diffusion.trained_gen_length == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error", EmptyResponseWarning)
        dyllm_fx.generate(model, tok, "12", gen_length=8, block_length=8, progress=False, stop_at_eos=False)
    with pytest.warns(
        EmptyResponseWarning, match=r"trained with a 8-token response window.*gen_length=16 differs"
    ):
        dyllm_fx.generate(model, tok, "12", gen_length=16, block_length=8, progress=False)


def test_cli_gen_length_outside_the_window_warns_on_stderr(tiny_llada_dir, capsys):
    folder = _with_training_window(tiny_llada_dir, 8)
    assert main(["generate", "12", "--model", str(folder), "--gen-length", "16", "--block-length", "8"]) == 0
    err = capsys.readouterr().err
    assert (
        "dyllm: warning: the model was trained with a 8-token response window" in err
        and "Traceback" not in err
    )


def test_empty_response_with_tokens_after_eos_warns():
    from dyllm_fx.generation import _warn_on_cut_responses

    spec = DiffusionSpec(mask_token_id=1, eos_token_ids=(0,))
    with pytest.warns(EmptyResponseWarning, match=r"response\(s\) \[0\] are empty"):
        _warn_on_cut_responses(["", "ok"], [[0, 7, 8, 0], [5, 6, 0, 0]], spec, TOK)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EmptyResponseWarning)
        _warn_on_cut_responses(["", "ok"], [[0, 0, 0, 0], [5, 6, 0, 0]], spec, TOK)  # EOS only: nothing cut


# --------------------------------------------------------------------------- generate() arguments


def test_max_new_tokens_is_gen_length(llada):
    a = dyllm_fx.generate(
        llada, TOK, "12", max_new_tokens=8, block_length=8, progress=False, stop_at_eos=False
    )
    b = dyllm_fx.generate(llada, TOK, "12", gen_length=8, block_length=8, progress=False, stop_at_eos=False)
    assert torch.equal(a.sequences, b.sequences) and a.sequences.shape[1] == 2 + 8
    with pytest.raises(ValueError, match="gen_length=16 and max_new_tokens=8 disagree"):
        dyllm_fx.generate(llada, TOK, "12", gen_length=16, max_new_tokens=8, progress=False)


def test_sampler_option_of_the_other_family_names_the_right_one(llada):
    with pytest.raises(ValueError, match=r"alg='entropy' is a Dream sampler option.*LLaDA model.*remasking="):
        dyllm_fx.generate(llada, TOK, "12", alg="entropy", **KW)
    with pytest.raises(ValueError, match=r"remasking='random' is a LLaDA sampler option.*Dream model.*alg="):
        dyllm_fx.generate(tiny_dream(seed=0), TOK, "12", remasking="random", **KW)


def test_unknown_generate_argument_suggests_a_name(llada):
    with pytest.raises(ValueError, match=r"unknown argument 'temprature'; did you mean 'temperature'"):
        dyllm_fx.generate(llada, TOK, "12", temprature=0.5, **KW)
    with pytest.raises(TypeError, match="temperature must be a number"):
        dyllm_fx.generate(llada, TOK, "12", temperature="hot", **KW)


# --------------------------------------------------------------------------- policy parameters


@pytest.mark.parametrize("value", [True, "a", None])
def test_tau_of_the_wrong_type(llada, value):
    with pytest.raises(TypeError, match=rf"tau must be a number, got {type(value).__name__}"):
        dyllm_fx.transform(llada, policy="dyllm", tau=value)


def test_policy_parameter_names_and_types_checked_before_the_trace(llada, monkeypatch):
    from dyllm_fx.adapters import llada_dream  # the adapter captures the step

    monkeypatch.setattr(llada_dream, "capture_module", _no_load)
    with pytest.raises(
        ValueError,
        match=r"bad parameters for policy 'dyllm': it has no parameter 'tua' \(did you mean "
        r"'tau'\?\).*tau=0\.99",
    ):
        dyllm_fx.transform(llada, policy="dual_cache+dyllm", tua=0.9)
    with pytest.raises(ValueError, match="policy 'fixed': it needs rows"):
        dyllm_fx.transform(llada, policy="fixed")
    with pytest.raises(TypeError, match="block_update_freq must be an integer, got float 2.5"):
        dyllm_fx.transform(llada, policy="es_dllm", block_update_freq=2.5)
    with pytest.raises(TypeError, match="cached_softmax_stats must be true or false"):
        dyllm_fx.transform(llada, policy="dyllm", cached_softmax_stats="yes")


def test_valid_parameter_spellings_still_build():
    import numpy as np

    from dyllm_fx.runtime.policies import make_policy

    assert make_policy("dyllm", tau=1).tau == 1.0  # an int is a number
    assert make_policy("es_dllm", skip_layers=(1, 2), keep=0.5).explicit == [
        (1, 0.5),
        (2, 0.5),
    ]  # a float or a list
    assert make_policy("es_dllm", skip_layers=[1], keep=[0.25]).explicit == [(1, 0.25)]
    assert make_policy("fixed", rows=np.array([0, 2])).index.tolist() == [0, 2]
    assert make_policy("fixed", rows=torch.tensor([[1, 2]])).index.shape == (1, 2)


# --------------------------------------------------------------------------- TransformedModel


def test_transformed_model_is_in_eval_mode_and_not_transformed_twice(llada):
    fast = dyllm_fx.transform(llada)
    assert fast.training is False
    with pytest.raises(
        ValueError, match=r"already transformed \(policy 'dense'\); transform the original model"
    ):
        dyllm_fx.transform(fast)


def test_casting_a_transformed_model_names_the_way_that_works(llada):
    fast = dyllm_fx.transform(llada)
    with pytest.raises(
        ValueError, match=r"cast the original model and transform it again: .*model\.to\(torch\.float64\)"
    ):
        fast.to(torch.float64)
    with pytest.raises(ValueError, match="cannot be cast to torch.float16"):
        fast.half()
    assert fast.to("cpu") is fast and fast.float() is fast  # no dtype change: fine
    out = dyllm_fx.generate(fast, TOK, "12", **KW)  # and still usable
    assert out.sequences.shape == (1, 10)
    fast64 = dyllm_fx.transform(tiny_llada(seed=0).to(torch.float64))  # the way that works
    assert dyllm_fx.generate(fast64, TOK, "12", **KW).sequences.shape == (1, 10)


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize(
    "kwargs,dtype",
    [
        ({"dtype": "float16"}, torch.float16),
        ({"dtype": "bf16"}, torch.bfloat16),
        ({"torch_dtype": "float32"}, torch.float32),
        ({"dtype": "torch.float64"}, torch.float64),
        ({"torch_dtype": torch.bfloat16}, torch.bfloat16),
    ],
)
def test_string_dtypes_and_torch_dtype(tiny_llada_dir, kwargs, dtype):
    model, _ = dyllm_fx.load(tiny_llada_dir, device="cpu", **kwargs)
    assert next(model.parameters()).dtype == dtype


def test_dtype_auto_reads_the_config(tiny_llada_dir):
    cfg = json.loads((tiny_llada_dir / "config.json").read_text())
    (tiny_llada_dir / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "bfloat16"}))
    model, _ = dyllm_fx.load(tiny_llada_dir, dtype="auto", device="auto")
    assert next(model.parameters()).dtype == (torch.bfloat16)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"dtype": torch.int8}, "not a floating-point dtype"),
        ({"dtype": "float8"}, "unknown dtype 'float8'"),
        ({"dtype": "float16", "torch_dtype": "bfloat16"}, "disagree"),
        ({"device": "tpu"}, "unknown device 'tpu'"),
        ({"device": "cuda:7"}, "cuda"),
    ],
)
def test_bad_dtype_or_device_fails_before_reading_weights(tiny_llada_dir, monkeypatch, kwargs, pattern):
    import dyllm_fx.loading as loading

    if "cuda:7" in str(kwargs) and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    monkeypatch.setattr(loading, "load_model", _no_load)
    with pytest.raises(ValueError, match=pattern):
        dyllm_fx.load(tiny_llada_dir, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu(tiny_llada_dir):
    with pytest.raises(ValueError, match=r"device 'cuda' asked for, but .*use device='cpu'"):
        dyllm_fx.load(tiny_llada_dir, device="cuda")


def test_hub_id_gets_the_download_command():
    with pytest.raises(
        FileNotFoundError,
        match=r"Hugging Face Hub id.*`hf download GSAI-ML/LLaDA-8B-Instruct --local-dir LLaDA-8B-Instruct`",
    ):
        dyllm_fx.load("GSAI-ML/LLaDA-8B-Instruct")


def test_hub_id_in_the_local_cache_loads(tiny_llada_dir, tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    import shutil

    repo = tmp_path / "hub" / "models--someone--tiny-llada"
    snapshot = repo / "snapshots" / "0123abcd"
    shutil.copytree(tiny_llada_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        model, _ = dyllm_fx.load("someone/tiny-llada", device="cpu")
    except FileNotFoundError:
        pytest.skip("this huggingface_hub does not read the patched cache location")
    assert model.diffusion.mask_token_id == TOK.mask_token_id


def test_truncated_safetensors_names_the_file(tiny_llada_dir):
    weights = tiny_llada_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors \(100 bytes\).*corrupt or truncated.*download it again"
    ):
        dyllm_fx.load(tiny_llada_dir, device="cpu")


def test_garbage_safetensors_names_the_file(tiny_llada_dir):
    (tiny_llada_dir / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match=r"cannot read weights file .*model\.safetensors"):
        dyllm_fx.load(tiny_llada_dir, device="cpu")


def test_bad_config_json_names_line_and_column(tiny_llada_dir):
    (tiny_llada_dir / "config.json").write_text('{"model_type": "llada",\n  "d_model": }')
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON \(line 2, column 14"):
        dyllm_fx.load(tiny_llada_dir, device="cpu")
    (tiny_llada_dir / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not an object"):
        dyllm_fx.load(tiny_llada_dir, device="cpu")


def test_no_tokenizer_files_checked_before_the_weights(tiny_llada_dir, monkeypatch):
    import dyllm_fx.loading as loading

    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tiny_llada_dir / name).unlink()
    monkeypatch.setattr(loading, "load_model", _no_load)
    with pytest.raises(CheckpointError, match="has no tokenizer files") as err:
        dyllm_fx.load(tiny_llada_dir, device="cpu")
    assert "sentencepiece" not in str(err.value)


# --------------------------------------------------------------------------- the CLI


def _cli(capsys, *argv):
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _one_error_line(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "error: " in lines[0] and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, err)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"dyllm-fx {dyllm_fx.__version__} (torch ")


def test_generate_with_a_composed_policy_and_json(tiny_llada_dir, capsys):
    rc, out, err = _cli(
        capsys,
        "generate",
        "12+3=",
        "kv:a1?a=",
        "--model",
        str(tiny_llada_dir),
        "--gen-length",
        "8",
        "--block-length",
        "4",
        "--policy",
        "dual_cache+dyllm",
        "--policy-arg",
        "tau=0.9",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--json",
    )
    assert rc == 0, err
    report = json.loads(out)
    assert report["policy"] == "dual_cache+dyllm" and report["policy_args"] == {"tau": 0.9}
    assert [o["prompt"] for o in report["outputs"]] == ["12+3=", "kv:a1?a="]
    assert all(isinstance(o["text"], str) for o in report["outputs"])
    assert report["stats"]["nfe"] > 0 and report["stats"]["cache_bytes"] > 0  # the transformed model ran


def test_generate_policy_dense_gives_vanilla_tokens(tiny_llada_dir, capsys):
    args = ["generate", "12+3=", "--model", str(tiny_llada_dir), "--gen-length", "8", "--block-length", "4"]
    rc, vanilla, _ = _cli(capsys, *args)
    rc2, dense, _ = _cli(capsys, *args, "--policy", "dense")
    assert rc == rc2 == 0 and vanilla == dense


def test_generate_dtype_float64_and_max_new_tokens(tiny_llada_dir, capsys):
    rc, out, err = _cli(
        capsys,
        "generate",
        "12",
        "--model",
        str(tiny_llada_dir),
        "--max-new-tokens",
        "8",
        "--block-length",
        "8",
        "--dtype",
        "float64",
        "--json",
    )
    assert rc == 0, err
    assert json.loads(out)["decoding"]["gen_length"] == 8


@pytest.mark.parametrize(
    "extra,needles",
    [
        (["--alg", "entropy"], ["alg='entropy' is a Dream sampler option"]),
        (["--device", "tpu"], ["unknown device 'tpu'"]),
        (["--policy", "dyllm", "--policy-arg", "tau=2"], ["tau must be in (0, 1]"]),
        (["--policy", "dyllm", "--policy-arg", "tau=a"], ["tau must be a number"]),
        (["--policy", "vanilla", "--compile"], ["takes no policy arguments or --compile"]),
        (["--policy", "dual_cache+fixed"], ["cannot compose"]),
        (["--threads", "0"], ["--threads must be at least 1"]),
        (["--block-length", "3"], ["block_length=3 must divide gen_length=8"]),
    ],
)
def test_generate_errors_are_one_line_before_loading(tiny_llada_dir, capsys, monkeypatch, extra, needles):
    import dyllm_fx.loading as loading

    monkeypatch.setattr(loading, "load", _no_load)
    rc, _, err = _cli(
        capsys,
        "generate",
        "12",
        "--model",
        str(tiny_llada_dir),
        "--gen-length",
        "8",
        "--block-length",
        "8",
        *extra,
    )
    assert rc == 2
    _one_error_line(err, "dyllm generate: error:", *needles)


def test_remasking_on_dream_is_one_line(tiny_dream_dir, capsys):
    rc, _, err = _cli(
        capsys,
        "generate",
        "12",
        "--model",
        str(tiny_dream_dir),
        "--gen-length",
        "8",
        "--block-length",
        "8",  # a layout that is right: the block layout is checked first, before torch imports
        "--remasking",
        "random",
    )
    assert rc == 2
    _one_error_line(err, "remasking='random' is a LLaDA sampler option")


def test_dream_threshold_needs_maskgit_plus(tiny_dream_dir, capsys):
    args = [
        "generate",
        "12",
        "--model",
        str(tiny_dream_dir),
        "--gen-length",
        "8",
        "--block-length",
        "8",
        "--threshold",
        "0.9",
    ]
    rc, _, err = _cli(capsys, *args)
    assert rc == 2
    _one_error_line(err, "alg='maskgit_plus'")
    # With --alg maskgit_plus every check passes (not decoded here: threshold decoding runs until
    # the block is unmasked, and this random model keeps predicting the mask token).
    from dyllm_fx.cli.common_args import check_run

    assert check_run(build_parser().parse_args([*args, "--alg", "maskgit_plus"]))["dtype"] == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_a_gpu_is_one_line(tiny_llada_dir, capsys):
    rc, _, err = _cli(capsys, "generate", "12", "--model", str(tiny_llada_dir), "--device", "cuda")
    assert rc == 2
    _one_error_line(err, "device 'cuda' asked for")


def test_corrupt_weights_are_one_line(tiny_llada_dir, capsys):
    (tiny_llada_dir / "model.safetensors").write_bytes(b"\x00" * 16)
    rc, _, err = _cli(
        capsys, "generate", "12", "--model", str(tiny_llada_dir), "--gen-length", "8", "--block-length", "8"
    )
    assert rc == 2
    _one_error_line(err, "model.safetensors", "download it again")


def test_onnx_without_onnxruntime_is_one_line(tmp_path, capsys, monkeypatch):
    step = tmp_path / "step.onnx"
    step.write_bytes(b"not really")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    rc, _, err = _cli(capsys, "generate", "12", "--onnx", str(step))
    assert rc == 2
    _one_error_line(err, "onnxruntime")


def test_onnx_refuses_compile_and_dtype(tmp_path, capsys):
    rc, _, err = _cli(capsys, "generate", "12", "--onnx", str(tmp_path / "x.onnx"), "--dtype", "float16")
    assert rc == 2
    _one_error_line(err, "do not apply to --onnx")


def test_debug_shows_the_traceback(capsys):
    rc, _, err = _cli(capsys, "generate", "12", "--device", "tpu", "--debug")
    assert (
        rc == 2 and "Traceback" in err and err.rstrip().splitlines()[-1].startswith("dyllm generate: error:")
    )
    rc, _, err = _cli(capsys, "--debug", "info", "/no/such/folder")
    assert rc == 2 and "Traceback" in err


def test_internal_errors_say_to_rerun_with_debug(capsys, monkeypatch):
    import dyllm_fx.cli.main as cli

    def boom(args):
        raise RuntimeError("something inside broke")

    monkeypatch.setitem(cli.HANDLERS, "info", boom)
    rc, _, err = _cli(capsys, "info")
    assert rc == 1 and "internal error: RuntimeError: something inside broke" in err
    assert "rerun with --debug" in err and "Traceback" not in err


def test_ctrl_c_during_eval_exits_130(tiny_llada_dir, capsys, monkeypatch):
    import dyllm_fx.eval.evaluate as evaluation

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "evaluate_policy", interrupted)
    rc, _, err = _cli(
        capsys,
        "eval",
        "--model",
        str(tiny_llada_dir),
        "--limit",
        "1",
        "--gen-length",
        "8",
        "--block-length",
        "8",
    )
    assert rc == 130 and "interrupted" in err and "Traceback" not in err


def test_eval_checks_policy_values_before_loading(capsys, monkeypatch):
    import dyllm_fx.eval.evaluate as evaluation
    import dyllm_fx.loading as loading

    monkeypatch.setattr(loading, "load", _no_load)
    monkeypatch.setattr(evaluation, "evaluate_policy", _no_load)  # the vanilla reference run is in here
    rc, _, err = _cli(capsys, "eval", "--policy", "dyllm", "--policy-arg", "tau=2", "--limit", "1")
    assert rc == 2
    _one_error_line(err, "tau must be in (0, 1]")


@pytest.mark.slow
def test_eval_and_plot_accept_compositions(tiny_llada_dir, tmp_path, capsys):
    rc, out, err = _cli(
        capsys,
        "eval",
        "--model",
        str(tiny_llada_dir),
        "--policy",
        "dual_cache+dyllm",
        "--limit",
        "2",
        "--gen-length",
        "8",
        "--block-length",
        "4",
        "--reference",
        "none",
        "--quiet",
    )
    assert rc == 0, err
    assert "policy dual_cache+dyllm:" in out
    pytest.importorskip("matplotlib")
    png = tmp_path / "s.png"
    rc, _, err = _cli(
        capsys,
        "plot",
        "saliency",
        "--model",
        str(tiny_llada_dir),
        "--policy",
        "dual_cache+dyllm",
        "--prompt",
        "12+3=",
        "--gen-length",
        "8",
        "--block-length",
        "4",
        "--out",
        str(png),
    )
    assert rc == 0, err
    assert png.stat().st_size > 0


def test_bench_plot_without_matplotlib_fails_before_the_bench(tmp_path, capsys, monkeypatch):
    import dyllm_fx.eval.methods_bench as bench
    import dyllm_fx.loading as loading

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # importing it raises ImportError
    monkeypatch.setattr(loading, "load", _no_load)
    monkeypatch.setattr(bench, "run_bench", _no_load)
    rc, _, err = _cli(capsys, "bench", "--plot", str(tmp_path / "p.png"))
    assert rc == 2
    _one_error_line(err, "matplotlib", "dyllm-fx[plot]")


def test_policy_names_in_the_help_match_the_registry():
    from dyllm_fx.policy_setup import COMPOSITIONS, POLICY_NAMES
    from dyllm_fx.runtime.policies import BLOCK_SCOPES, POLICIES, ROW_POLICIES, make_policy

    assert set(POLICY_NAMES) == set(POLICIES)
    assert set(COMPOSITIONS) == {f"{b}+{r}" for b in BLOCK_SCOPES for r in ROW_POLICIES}
    for name in COMPOSITIONS:
        assert make_policy(name).name == name


# --------------------------------------------------------------------------- --help without torch


_NO_TORCH = """
import sys
import dyllm_fx.cli.main as cli
for argv in {argvs!r}:
    try:
        cli.main(argv)
    except SystemExit as e:
        assert e.code == 0, (argv, e.code)
heavy = sorted(m for m in ("torch", "transformers", "numpy", "safetensors") if m in sys.modules)
assert not heavy, heavy
print("ok")
"""


def test_help_and_version_do_not_import_torch():
    argvs = [
        ["--help"],
        ["--version"],
        *([cmd, "--help"] for cmd in ("generate", "info", "eval", "export", "bench", "plot")),
        ["plot", "saliency", "--help"],
        ["plot", "pareto", "--help"],
    ]
    proc = subprocess.run(
        [sys.executable, "-c", _NO_TORCH.format(argvs=argvs)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


@pytest.mark.slow
def test_the_package_imports_lazily_and_keeps_its_api():
    code = (
        "import sys, dyllm_fx; assert 'torch' not in sys.modules; "
        "from dyllm_fx.transform import TransformedModel; import dyllm_fx.explain; "
        "assert callable(dyllm_fx.transform) and callable(dyllm_fx.explain) and callable(dyllm_fx.load); "
        "assert dyllm_fx.TransformedModel is TransformedModel and dyllm_fx.export.to_onnx; "
        "from dyllm_fx import *; print('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_usage_error_is_a_value_error():
    assert issubclass(UsageError, ValueError) and issubclass(CheckpointError, ValueError)
