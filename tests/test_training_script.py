"""examples/train_tiny_mdlm.py runs, writes a folder that dyllm_fx.load reads, trains the Dream
architecture with its logit shift, and never overwrites a shipped model by default."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dyllm_fx

# Slow (`-m "not slow"` leaves it out): trains.
pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_tiny_mdlm.py"
TINY = [
    "--steps",
    "2",
    "--batch-size",
    "4",
    "--d-model",
    "32",
    "--layers",
    "1",
    "--heads",
    "2",
    "--mlp",
    "48",
    "--threads",
    "1",
    "--eval-every",
    "0",
    "--eval-n",
    "1",
]


def _script():
    """The example script as a module (loaded from its file: examples/ is not a package)."""
    if "train_tiny_mdlm" not in sys.modules:
        spec = importlib.util.spec_from_file_location("train_tiny_mdlm", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["train_tiny_mdlm"] = module
        spec.loader.exec_module(module)
    return sys.modules["train_tiny_mdlm"]


def test_two_training_steps_produce_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "ckpt"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), *TINY], check=True, capture_output=True, timeout=180
    )
    model, tok = dyllm_fx.load(out)
    assert model.config.d_model == 32 and tok.mask_token_id == model.diffusion.mask_token_id
    info = json.loads((out / "training.json").read_text())
    assert info["steps"] == 2 and len(info["stages"]) == 1 and "--out" in info["stages"][0]["command"]


def test_dream_architecture_and_resume(tmp_path):
    first, second = tmp_path / "dream", tmp_path / "dream-2"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--arch", "dream", "--out", str(first), "--kv-heads", "1", *TINY],
        check=True,
        capture_output=True,
        timeout=180,
    )
    model, _ = dyllm_fx.load(first)
    assert model.architecture == "dream" and model.diffusion.logits_shift == 1
    assert model.config.num_key_value_heads == 1 and (first / "optimizer.pt").is_file()
    # Resuming infers the architecture from the checkpoint and appends a stage.
    subprocess.run(
        [sys.executable, str(SCRIPT), "--init-from", str(first), "--out", str(second), *TINY],
        check=True,
        capture_output=True,
        timeout=180,
    )
    info = json.loads((second / "training.json").read_text())
    assert [s["steps"] for s in info["stages"]] == [2, 2] and info["steps"] == 4
    assert dyllm_fx.load(second)[0].architecture == "dream"


def test_default_output_is_outside_the_package():
    t = _script()
    args = t.parse_args([])
    assert args.out == "runs/tiny-llada" and not t.writes_into_assets(args.out)
    assert t.parse_args(["--arch", "dream"]).out == "runs/tiny-dream"


def test_refuses_to_write_into_shipped_models(tmp_path):
    shipped = dyllm_fx.default_model_path()
    before = {p.name: p.stat().st_mtime_ns for p in shipped.iterdir()} if shipped.is_dir() else {}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(shipped), *TINY],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 2 and "--overwrite-shipped" in proc.stderr
    nested = shipped.parent / "scratch"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(nested), *TINY],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 2 and not nested.exists()
    after = {p.name: p.stat().st_mtime_ns for p in shipped.iterdir()} if shipped.is_dir() else {}
    assert after == before  # nothing of the shipped model was touched
    t = _script()
    assert t.writes_into_assets(shipped) and t.writes_into_assets(shipped / ".." / "tiny-dream")
    assert not t.writes_into_assets(tmp_path / "assets" / "tiny-llada")
    assert t.parse_args(
        ["--out", str(shipped), "--overwrite-shipped"]
    ).overwrite_shipped  # the explicit opt-in


def test_mdlm_loss_weights_masked_tokens_by_inverse_ratio():
    t = _script()

    class Uniform(torch.nn.Module):  # logits 0 everywhere: CE = log(V) on every masked token
        def forward(self, x):
            return torch.zeros(*x.shape, 8)

    x0 = torch.randint(2, 8, (4, 10))
    torch.manual_seed(0)
    loss = t.mdlm_loss(Uniform(), x0, prompt_len=2, mask_id=1)
    # E[sum over masked of CE / t] = gen * log(V) per row, so the mean is near log(V)
    assert 0.3 * torch.log(torch.tensor(8.0)) < loss < 3 * torch.log(torch.tensor(8.0))


def test_dream_loss_reads_the_logits_one_position_to_the_left():
    t = _script()
    vocab, prompt_len = 8, 3
    x0 = torch.randint(2, vocab, (2, 9))

    class Oracle(torch.nn.Module):
        """Logits at position i put all mass on the token at ``i + shift``: perfect only when the
        loss reads them with the same shift."""

        def __init__(self, shift):
            super().__init__()
            self.shift = shift

        def forward(self, x):
            target = torch.roll(x0, -self.shift, dims=1)
            return torch.nn.functional.one_hot(target, vocab).float() * 50.0

    for shift in (0, 1):
        torch.manual_seed(1)
        assert t.mdlm_loss(Oracle(shift), x0, prompt_len, mask_id=1, weighting="mean", shift=shift) < 1e-6
        torch.manual_seed(1)
        assert t.mdlm_loss(Oracle(shift), x0, prompt_len, mask_id=1, weighting="mean", shift=1 - shift) > 1.0


@pytest.mark.parametrize("name", sorted(dyllm_fx.EMBEDDED_MODELS))
def test_shipped_models_record_their_recipe(name):
    folder = dyllm_fx.default_model_path(name)
    if not (folder / "config.json").is_file():
        pytest.skip(f"{name} not built")
    info = json.loads((folder / "training.json").read_text())
    assert info["stages"] and all("train_tiny_mdlm.py" in s["command"] for s in info["stages"])
    assert not (folder / "optimizer.pt").exists()  # optimizer state stays out of the package
    model, _ = dyllm_fx.load(name)
    assert len(model.layers) >= 8
    assert sum(p.numel() for p in model.parameters()) * 4 <= 25e6
    assert model.diffusion.logits_shift == (1 if name == "default-dream" else 0)


def test_llada_weights_convert_to_the_dream_layout():
    from tiny_checkpoints import tiny_llada

    t = _script()
    llada = tiny_llada(seed=3, n_layers=2).eval()
    dream = t.llada_to_dream(llada).eval()
    assert dream.architecture == "dream" and dream.diffusion.logits_shift == 1
    x = torch.randint(3, 40, (2, 12))
    torch.testing.assert_close(dream(x), llada(x))  # same function; only the reading of the logits moves
