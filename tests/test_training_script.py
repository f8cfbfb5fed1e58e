"""examples/train_tiny_mdlm.py runs and writes a folder that dyllm_fx.load reads."""

import subprocess
import sys
from pathlib import Path

import torch

import dyllm_fx

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_tiny_mdlm.py"


def test_two_training_steps_produce_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "ckpt"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--steps", "2", "--batch-size", "4", "--d-model", "32",
         "--layers", "1", "--heads", "2", "--mlp", "48", "--threads", "1"],
        check=True, capture_output=True, timeout=120,
    )
    model, tok = dyllm_fx.load(out)
    assert model.config.d_model == 32 and tok.mask_token_id == model.diffusion.mask_token_id
    assert (out / "training.json").is_file()


def test_mdlm_loss_weights_masked_tokens_by_inverse_ratio(monkeypatch):
    sys.path.insert(0, str(SCRIPT.parent))
    import train_tiny_mdlm as t

    class Uniform(torch.nn.Module):  # logits 0 everywhere: CE = log(V) on every masked token
        def forward(self, x):
            return torch.zeros(*x.shape, 8)

    x0 = torch.randint(2, 8, (4, 10))
    torch.manual_seed(0)
    loss = t.mdlm_loss(Uniform(), x0, prompt_len=2, mask_id=1)
    # E[sum over masked of CE / t] = gen * log(V) per row, so the mean is near log(V)
    assert 0.3 * torch.log(torch.tensor(8.0)) < loss < 3 * torch.log(torch.tensor(8.0))
