"""Train the embedded LLaDA-architecture masked diffusion model on the synthetic task suite.

MDLM / LLaDA-SFT masking: the prompt is kept, each response token (answer + EOS padding to
the generation window) is masked with probability t ~ U(eps, 1). The default loss is the mean
cross-entropy over masked tokens (``--loss mean``). The ELBO weighting by 1/t (``--loss elbo``,
as LLaDA) learns far slower at this batch size: the rare nearly-unmasked samples get weights up
to 1/eps and dominate the clipped gradient (200 steps on `shift`: 7% token accuracy with elbo,
33% with mean).

    python examples/train_tiny_mdlm.py --out dyllm_fx/assets/tiny-llada --minutes 45

The result is a regular checkpoint folder (config.json, model.safetensors, tokenizer files)
that ``dyllm_fx.load`` reads like any LLaDA checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dyllm_fx.char_tokenizer import build_char_tokenizer
from dyllm_fx.models import LLaDAConfig, LLaDAModelLM, load_model, save_model
from dyllm_fx.tasks import ALPHABET, TASKS, sample


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="dyllm_fx/assets/tiny-llada")
    p.add_argument("--steps", type=int, default=100_000, help="upper bound; --minutes usually stops first")
    p.add_argument("--minutes", type=float, default=45.0, help="wall-clock training budget")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--loss", choices=["mean", "elbo"], default="mean", help="masked-token CE: plain mean or 1/t weighted")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mlp", type=int, default=384)
    p.add_argument("--gen-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--init-from", default=None, help="continue from this checkpoint folder (same architecture)")
    return p.parse_args()


def make_batch(tokenizer, task: str, rng: random.Random, batch_size: int, gen_length: int) -> tuple[torch.Tensor, int]:
    """(B, P + G) token ids for one task (fixed prompt length per task, so no padding)."""
    rows, prompt_len = [], None
    for _ in range(batch_size):
        ex = sample(task, rng, "train")
        prompt = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        answer = tokenizer(ex.answer, add_special_tokens=False)["input_ids"]
        response = answer + [tokenizer.eos_token_id] * (gen_length - len(answer))
        prompt_len = prompt_len or len(prompt)
        assert len(prompt) == prompt_len and len(response) == gen_length, "tasks must have fixed-length prompts"
        rows.append(prompt + response)
    return torch.tensor(rows), prompt_len


def mdlm_loss(model, x0: torch.Tensor, prompt_len: int, mask_id: int, eps: float = 1e-3, weighting: str = "elbo") -> torch.Tensor:
    bsz, total = x0.shape
    gen = total - prompt_len
    t = torch.rand(bsz, 1) * (1 - eps) + eps
    masked = torch.rand(bsz, gen) < t
    xt = x0.clone()
    xt[:, prompt_len:][masked] = mask_id
    logits = model(xt)[:, prompt_len:]
    ce = F.cross_entropy(logits[masked], x0[:, prompt_len:][masked], reduction="none")
    if weighting == "mean":
        return ce.mean()
    return (ce / t.expand(-1, gen)[masked]).sum() / (bsz * gen)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tokenizer = build_char_tokenizer(ALPHABET)
    cfg = LLaDAConfig(
        d_model=args.d_model, n_heads=args.heads, n_kv_heads=args.heads, n_layers=args.layers,
        mlp_hidden_size=args.mlp, vocab_size=len(tokenizer), embedding_size=len(tokenizer),
        max_sequence_length=256, rope_theta=10000.0, mask_token_id=tokenizer.mask_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    if args.init_from:
        model = load_model(args.init_from).train()
        cfg = model.config
    else:
        model = LLaDAModelLM(cfg)
        for name, p in model.named_parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=0.02 if "wte" not in name else 0.05)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, config {cfg}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    out = Path(args.out)
    start, budget = time.time(), args.minutes * 60
    tasks = sorted(TASKS)
    ema = None
    step = 0
    for step in range(1, args.steps + 1):
        elapsed = time.time() - start
        if elapsed > budget:
            break
        # Warmup, then cosine decay over the wall-clock budget (the step count is not known up front).
        frac = min(elapsed / budget, 1.0)
        lr = args.lr * min(1.0, step / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        x0, prompt_len = make_batch(tokenizer, tasks[step % len(tasks)], rng, args.batch_size, args.gen_length)
        loss = mdlm_loss(model, x0, prompt_len, cfg.mask_token_id, weighting=args.loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 50 == 0:
            print(f"step {step} loss {ema:.4f} lr {lr:.2e} elapsed {elapsed / 60:.1f} min", flush=True)
        if step % args.save_every == 0:
            save(model, tokenizer, out, step, time.time() - start, ema, args)
    save(model, tokenizer, out, step, time.time() - start, ema, args)
    print(f"saved {out} after {step} steps, {(time.time() - start) / 60:.1f} min", flush=True)


def save(model, tokenizer, out: Path, step: int, seconds: float, loss: float, args: argparse.Namespace) -> None:
    save_model(model, out)
    tokenizer.save_pretrained(out)
    info = {"steps": step, "train_minutes": round(seconds / 60, 1), "final_loss": round(loss, 4), "args": vars(args)}
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
