"""Train a small masked diffusion model (LLaDA or Dream architecture) on the synthetic task suite.

MDLM / LLaDA-SFT masking: the prompt is kept, each response token (answer + EOS padding to
the generation window) is masked with probability t ~ U(eps, 1), and the loss is the mean
cross-entropy over the masked tokens (``--loss mean``; ``--loss elbo`` weights each token by
1/t as LLaDA does, which learns far slower at this batch size). ``--arch dream`` trains the
Dream architecture (Qwen2 key names, q/k/v biases) with Dream's logit shift: the token at
position i is predicted from the logits at position i - 1, as the runtime reads them.

    # a 2-stage recipe: train, then resume from the checkpoint with --init-from
    python examples/train_tiny_mdlm.py --arch llada --out runs/llada --steps 20000 --threads 1
    python examples/train_tiny_mdlm.py --arch llada --init-from runs/llada --out runs/llada-2 --steps 10000
    --lr 5e-4

The output is a regular checkpoint folder (config.json, model.safetensors, tokenizer files,
training.json with every stage's command line, loss curve and held-out evaluations) that
``dyllm_fx.load`` reads like any LLaDA / Dream checkpoint, plus optimizer.pt for resuming.
The default output folder is ``runs/tiny-<arch>`` under the current directory. The script
refuses to write into the package's shipped models (``dyllm_fx/assets``) unless
``--overwrite-shipped`` is given; optimizer state is never written there.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dyllm_fx.char_tokenizer import build_char_tokenizer
from dyllm_fx.eval.synthetic_tasks import ALPHABET, SUITE_VERSION, TASKS, held_out_set, sample
from dyllm_fx.models import DreamConfig, DreamModel, LLaDAConfig, LLaDAModelLM, load_model, save_model

ARCHS = ("llada", "dream")
OPTIMIZER_FILE = "optimizer.pt"


def assets_dirs() -> list[Path]:
    """Folders that hold shipped models: the installed package's assets and, when run from a
    checkout, the checkout's ``dyllm_fx/assets`` (the same folder for an editable install)."""
    import dyllm_fx.assets

    dirs = {Path(dyllm_fx.assets.__file__).resolve().parent}
    dirs.add((Path(__file__).resolve().parents[1] / "dyllm_fx" / "assets").resolve())
    return sorted(dirs)


def writes_into_assets(out: str | Path) -> bool:
    out = Path(out).expanduser().resolve()
    return any(out == d or d in out.parents for d in assets_dirs())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--arch",
        choices=ARCHS,
        default=None,
        help="llada (default) or dream; with --init-from, the checkpoint's",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output folder (default runs/tiny-<arch>; never inside dyllm_fx/assets "
        "unless --overwrite-shipped)",
    )
    p.add_argument(
        "--overwrite-shipped",
        action="store_true",
        help="allow --out to point into dyllm_fx/assets (replaces a model the package ships)",
    )
    p.add_argument(
        "--steps", type=int, default=20_000, help="optimizer steps of this stage (the lr schedule spans them)"
    )
    p.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="optional wall-clock cap; stops early (lr not fully decayed)",
    )
    p.add_argument("--batch-size", type=int, default=48, help="sequences per optimizer step, over all tasks")
    p.add_argument(
        "--loss", choices=["mean", "elbo"], default="mean", help="masked-token CE: plain mean or 1/t weighted"
    )
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--min-lr", type=float, default=0.05, help="final lr as a fraction of --lr (cosine decay)")
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None, help="grouped-query K/V heads (default: --heads)")
    p.add_argument("--mlp", type=int, default=384)
    p.add_argument("--tie-embeddings", action="store_true", help="share the input embedding with the LM head")
    p.add_argument("--gen-length", type=int, default=64, help="response window (answer + EOS padding)")
    p.add_argument(
        "--short-window",
        type=float,
        default=0.0,
        help="fraction of batches trained with a window just long enough for the task's answers "
        "(the next multiple of 16), so the model also decodes into shorter windows",
    )
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks of the suite")
    p.add_argument(
        "--batching",
        choices=["mixed", "task"],
        default="mixed",
        help="mixed: every step holds every task (one micro-batch each); task: one task per step "
        "(learns far slower: consecutive steps pull toward different tasks)",
    )
    p.add_argument(
        "--sampling",
        choices=["uniform", "loss"],
        default="loss",
        help="share of each task in a step (mixed) or task of a step (task): uniform, or in proportion to "
        "each task's running loss to the power --sampling-power (hard tasks more often)",
    )
    p.add_argument(
        "--sampling-power",
        type=float,
        default=0.5,
        help="exponent of the running loss in --sampling loss (1: proportional, which starves tasks that "
        "are nearly learnt; 0.5 default)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--save-every", type=int, default=1000)
    p.add_argument(
        "--eval-every", type=int, default=2000, help="held-out exact match every N steps (0: only at the end)"
    )
    p.add_argument(
        "--probe-every", type=int, default=250, help="answer-token accuracy probe every N steps (0: never)"
    )
    p.add_argument("--eval-n", type=int, default=16, help="held-out prompts per task for those evaluations")
    p.add_argument(
        "--init-from",
        default=None,
        help="continue from this checkpoint folder (same architecture; its optimizer.pt is loaded when "
        "present). "
        "With --arch dream, a LLaDA folder is converted to the Dream layout and trained with the shift",
    )
    args = p.parse_args(argv)
    if args.arch is None:
        args.arch = (
            json.loads((Path(args.init_from) / "config.json").read_text()).get("model_type", "llada")
            if (args.init_from and (Path(args.init_from) / "config.json").is_file())
            else "llada"
        )
    if args.out is None:
        args.out = f"runs/tiny-{args.arch}"
    if writes_into_assets(args.out) and not args.overwrite_shipped:
        p.error(
            f"--out {args.out} is inside dyllm_fx/assets, which holds the models the package ships; "
            "write elsewhere and copy the folder, or pass --overwrite-shipped to replace a shipped model"
        )
    unknown = sorted(set(args.tasks.split(",")) - set(TASKS))
    if unknown:
        p.error(f"unknown task(s) {unknown}; the suite has {sorted(TASKS)}")
    return args


def build_model(args: argparse.Namespace, tokenizer):
    """A fresh model of the requested architecture and size."""
    common = dict(
        mask_token_id=tokenizer.mask_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    kv = args.kv_heads or args.heads
    if args.arch == "llada":
        cfg = LLaDAConfig(
            d_model=args.d_model,
            n_heads=args.heads,
            n_kv_heads=kv,
            n_layers=args.layers,
            mlp_hidden_size=args.mlp,
            vocab_size=len(tokenizer),
            embedding_size=len(tokenizer),
            max_sequence_length=256,
            rope_theta=10000.0,
            weight_tying=args.tie_embeddings,
            **common,
        )
        model = LLaDAModelLM(cfg)
    else:
        cfg = DreamConfig(
            hidden_size=args.d_model,
            intermediate_size=args.mlp,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            num_key_value_heads=kv,
            vocab_size=len(tokenizer),
            max_position_embeddings=256,
            rope_theta=10000.0,
            tie_word_embeddings=args.tie_embeddings,
            **common,
        )
        model = DreamModel(cfg)
    for name, p in model.named_parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.05 if ("wte" in name or "embed_tokens" in name) else 0.02)
        elif name.endswith(".bias"):
            torch.nn.init.zeros_(p)
    return model


def llada_to_dream(llada: LLaDAModelLM) -> DreamModel:
    """A Dream-architecture model holding a LLaDA model's weights (q/k/v biases zero, the same
    norms, RoPE and vocabulary), for ``--arch dream --init-from LLADA_FOLDER``: Dream itself
    was initialised from an existing model. The logit shift is not carried over; training
    with the shifted loss teaches it."""
    c = llada.config
    cfg = DreamConfig(
        hidden_size=c.d_model,
        intermediate_size=c.mlp_hidden_size,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        num_key_value_heads=c.kv_heads,
        vocab_size=c.padded_vocab,
        max_position_embeddings=c.max_sequence_length,
        rope_theta=c.rope_theta,
        rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=c.weight_tying,
        mask_token_id=c.mask_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
    )
    dream = DreamModel(cfg)
    src = llada.state_dict()
    names = {
        "model.transformer.wte.weight": "model.embed_tokens.weight",
        "model.transformer.ln_f.weight": "model.norm.weight",
        "model.transformer.ff_out.weight": "lm_head.weight",
    }
    block = {
        "attn_norm": "input_layernorm",
        "ff_norm": "post_attention_layernorm",
        "q_proj": "self_attn.q_proj",
        "k_proj": "self_attn.k_proj",
        "v_proj": "self_attn.v_proj",
        "attn_out": "self_attn.o_proj",
        "ff_proj": "mlp.gate_proj",
        "up_proj": "mlp.up_proj",
        "ff_out": "mlp.down_proj",
    }
    for i in range(c.n_layers):
        for a, b in block.items():
            names[f"model.transformer.blocks.{i}.{a}.weight"] = f"model.layers.{i}.{b}.weight"
    state = {names[k]: v for k, v in src.items()}
    for name, p in dream.named_parameters():
        if name.endswith(".bias"):
            state[name] = torch.zeros_like(p)
    dream.load_state_dict(state, strict=True)
    return dream


def logits_shift(model) -> int:
    return model.diffusion.logits_shift


def make_batch(
    tokenizer, task: str, rng: random.Random, batch_size: int, gen_length: int
) -> tuple[torch.Tensor, int]:
    """(B, P + G) token ids for one task (fixed prompt length per task, so no padding)."""
    rows, prompt_len = [], None
    for _ in range(batch_size):
        ex = sample(task, rng, "train")
        prompt = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        answer = tokenizer(ex.answer, add_special_tokens=False)["input_ids"]
        if len(answer) > gen_length:
            raise ValueError(
                f"a {task} answer has {len(answer)} tokens, more than the window of {gen_length}"
            )
        response = answer + [tokenizer.eos_token_id] * (gen_length - len(answer))
        prompt_len = prompt_len or len(prompt)
        assert len(prompt) == prompt_len, "tasks must have fixed-length prompts"
        rows.append(prompt + response)
    return torch.tensor(rows), prompt_len


def mdlm_loss(
    model,
    x0: torch.Tensor,
    prompt_len: int,
    mask_id: int,
    eps: float = 1e-3,
    weighting: str = "elbo",
    shift: int = 0,
) -> torch.Tensor:
    """Masked-token cross-entropy of one batch.

    ``shift`` is the model's logit shift: with 1 (Dream) the logits at position i - 1 predict
    the token at position i, so the response's logits are read one position to the left.
    """
    bsz, total = x0.shape
    gen = total - prompt_len
    t = torch.rand(bsz, 1) * (1 - eps) + eps
    masked = torch.rand(bsz, gen) < t
    xt = x0.clone()
    xt[:, prompt_len:][masked] = mask_id
    logits = model(xt)[:, prompt_len - shift : total - shift]
    ce = F.cross_entropy(logits[masked], x0[:, prompt_len:][masked], reduction="none")
    if weighting == "mean":
        return ce.mean() if ce.numel() else logits.sum() * 0.0
    return (ce / t.expand(-1, gen)[masked]).sum() / (bsz * gen)


def batch_plan(
    args: argparse.Namespace, tasks: list[str], task_loss: dict, rng: random.Random, step: int
) -> list[tuple[str, int]]:
    """The (task, sequences) micro-batches of one optimizer step.

    ``--batching mixed`` (default): every step holds every task, its share of --batch-size in
    proportion to the task's running loss under ``--sampling loss`` (at least 2 sequences),
    so no step pulls the weights toward one task alone. ``--batching task``: one task per step.
    """
    weights = None
    if args.sampling == "loss" and all(v is not None for v in task_loss.values()):
        weights = [max(task_loss[t], 0.02) ** args.sampling_power for t in tasks]
    if args.batching == "task":
        task = rng.choices(tasks, weights=weights)[0] if weights else tasks[step % len(tasks)]
        return [(task, args.batch_size)]
    weights = weights or [1.0] * len(tasks)
    total = sum(weights)
    return [(t, max(2, round(args.batch_size * w / total))) for t, w in zip(tasks, weights)]


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine decay from --lr to --min-lr * --lr at --steps."""
    warm = min(1.0, step / max(args.warmup, 1))
    frac = min(step / max(args.steps, 1), 1.0)
    return args.lr * warm * (args.min_lr + (1 - args.min_lr) * 0.5 * (1 + math.cos(math.pi * frac)))


def held_out_eval(model, tokenizer, n: int, tasks: list[str], gen_length: int) -> dict:
    """Exact match per task on the first ``n`` held-out prompts, vanilla decoding."""
    from dyllm_fx.eval.evaluate import evaluate

    model.eval()
    try:
        res = evaluate(
            model,
            tokenizer,
            held_out_set(n, tuple(tasks)),
            batch_size=16,
            progress=False,
            gen_length=gen_length,
            block_length=32 if gen_length % 32 == 0 else gen_length,
        )
    finally:
        model.train()
    per = {t: s.accuracy for t, s in res.per_task.items()}
    return {"per_task": per, "accuracy": res.accuracy, "n_per_task": n}


def token_probe(
    model, tokenizer, tasks: list[str], shift: int, window: int, ratios=(1.0, 0.5, 0.1), n: int = 32
) -> dict:
    """Answer-token accuracy per task on held-out prompts in one forward over a ``window``-token
    response, with that fraction of it masked (the rest given): a fast signal long before exact
    match moves."""
    model.eval()
    out = {}
    try:
        for task in tasks:
            examples = held_out_set(n, (task,), seed=99)
            plen = len(examples[0].prompt)
            x0 = torch.tensor(
                [
                    tokenizer(ex.prompt + ex.answer, add_special_tokens=False)["input_ids"]
                    + [tokenizer.eos_token_id] * (window - len(ex.answer))
                    for ex in examples
                ]
            )
            answer = x0[:, plen:] != tokenizer.eos_token_id
            g = torch.Generator().manual_seed(0)
            accs = {}
            for ratio in ratios:
                masked = torch.rand(len(examples), window, generator=g) < ratio
                xt = x0.clone()
                xt[:, plen:][masked] = tokenizer.mask_token_id
                with torch.no_grad():
                    pred = model(xt)[:, plen - shift : x0.shape[1] - shift].argmax(-1)
                hit = (pred == x0[:, plen:])[masked & answer]
                accs[str(ratio)] = round(hit.float().mean().item(), 4) if hit.numel() else None
            out[task] = accs
    finally:
        model.train()
    return out


def window_for(task: str, tokenizer, rng: random.Random, gen_length: int) -> int:
    """The shortest multiple of 16 that holds the task's longest answer (no EOS after a full one)."""
    longest = max(len(sample(task, rng, "train").answer) for _ in range(64))
    return min(gen_length, -(-longest // 16) * 16)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tokenizer = build_char_tokenizer(ALPHABET)
    out = Path(args.out)
    history: dict = {"stages": []}
    opt_state = None
    if args.init_from:
        src = Path(args.init_from)
        model = load_model(src).train()
        arch = model.architecture
        converted = arch == "llada" and args.arch == "dream"
        if converted:
            model = llada_to_dream(model).train()
        elif arch != args.arch:
            raise SystemExit(f"--init-from {src} is a {arch} checkpoint but --arch is {args.arch}")
        if (src / "training.json").is_file():
            history = json.loads((src / "training.json").read_text())
            history.setdefault("stages", [])
            if converted:
                history["initialised_from"] = {
                    "architecture": "llada",
                    "folder": str(src),
                    "stages": history.pop("stages"),
                }
                history["stages"] = []
        if (src / OPTIMIZER_FILE).is_file() and not converted:
            opt_state = torch.load(src / OPTIMIZER_FILE, map_location="cpu")
    else:
        model = build_model(args, tokenizer).train()
    shift = logits_shift(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {args.arch}, {n_params / 1e6:.2f}M parameters ({4 * n_params / 1e6:.1f} MB float32), "
        f"config {model.config}",
        flush=True,
    )
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    if opt_state is not None:
        try:
            opt.load_state_dict(opt_state)
            print("loaded optimizer state", flush=True)
        except ValueError as err:
            print(f"optimizer state not loaded ({err})", flush=True)
    tasks = args.tasks.split(",")
    short = {t: window_for(t, tokenizer, random.Random(1), args.gen_length) for t in tasks}
    task_loss = {t: None for t in tasks}
    offset = sum(s["steps"] for s in history["stages"])  # steps of earlier stages (for the curve's x axis)
    stage = {
        "command": shlex.join(
            [
                sys.executable.rsplit("/", 1)[-1],
                *(sys.argv if argv is None else ["train_tiny_mdlm.py", *argv]),
            ]
        ),
        "args": vars(args),
        "suite_version": SUITE_VERSION,
        "parameters": n_params,
        "steps": 0,
        "train_minutes": 0.0,
        "curve": [],
        "evals": [],
    }
    history["stages"].append(stage)
    start = time.time()
    ema, window_losses = None, []
    step = 0
    for step in range(1, args.steps + 1):
        if args.minutes is not None and time.time() - start > args.minutes * 60:
            step -= 1
            break
        lr = lr_at(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        value = 0.0
        plan = batch_plan(args, tasks, task_loss, rng, step)
        total = sum(count for _, count in plan)
        for task, count in plan:
            gen = short[task] if rng.random() < args.short_window else args.gen_length
            x0, prompt_len = make_batch(tokenizer, task, rng, count, gen)
            loss = mdlm_loss(model, x0, prompt_len, tokenizer.mask_token_id, weighting=args.loss, shift=shift)
            (loss * count / total).backward()  # every sequence of the step weighs the same
            task_value = loss.item()
            value += task_value * count / total
            task_loss[task] = (
                task_value if task_loss[task] is None else 0.9 * task_loss[task] + 0.1 * task_value
            )
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = value if ema is None else 0.98 * ema + 0.02 * value
        window_losses.append(value)
        if step % args.log_every == 0:
            elapsed = time.time() - start
            mean = sum(window_losses) / len(window_losses)
            window_losses = []
            stage["curve"].append([offset + step, round(mean, 5)])
            per = " ".join(f"{t}={v:.3f}" for t, v in task_loss.items() if v is not None)
            print(f"step {step} loss {mean:.4f} lr {lr:.2e} {elapsed / 60:.1f} min | {per}", flush=True)
        if args.probe_every and step % args.probe_every == 0:
            probe = token_probe(model, tokenizer, tasks, shift, args.gen_length)
            stage.setdefault("probes", []).append({"step": offset + step, "answer_token_accuracy": probe})
            print(
                f"probe step {step} (answer-token accuracy, all / half / a tenth masked): "
                + " ".join(f"{t}={v['1.0']:.2f}/{v['0.5']:.2f}/{v['0.1']:.2f}" for t, v in probe.items()),
                flush=True,
            )
        if args.eval_every and step % args.eval_every == 0:
            result = held_out_eval(model, tokenizer, args.eval_n, tasks, args.gen_length)
            stage["evals"].append({"step": offset + step, **result})
            print(
                f"eval step {step}: "
                + " ".join(f"{t}={100 * a:.0f}%" for t, a in result["per_task"].items())
                + f" all={100 * result['accuracy']:.1f}%",
                flush=True,
            )
        if step % args.save_every == 0:
            save(model, tokenizer, opt, out, history, stage, step, time.time() - start, ema)
    if not stage["evals"] or stage["evals"][-1]["step"] != offset + step:
        result = held_out_eval(model, tokenizer, args.eval_n, tasks, args.gen_length)
        stage["evals"].append({"step": offset + step, **result})
        print(
            f"eval step {step}: "
            + " ".join(f"{t}={100 * a:.0f}%" for t, a in result["per_task"].items())
            + f" all={100 * result['accuracy']:.1f}%",
            flush=True,
        )
    save(model, tokenizer, opt, out, history, stage, step, time.time() - start, ema)
    print(f"saved {out} after {step} steps, {(time.time() - start) / 60:.1f} min", flush=True)


def save(
    model,
    tokenizer,
    opt,
    out: Path,
    history: dict,
    stage: dict,
    step: int,
    seconds: float,
    loss: float | None,
) -> None:
    model.eval()
    save_model(model, out)
    model.train()
    tokenizer.save_pretrained(out)
    stage.update(
        steps=step, train_minutes=round(seconds / 60, 1), final_loss=None if loss is None else round(loss, 4)
    )
    history["steps"] = sum(s["steps"] for s in history["stages"])
    history["train_minutes"] = round(sum(s["train_minutes"] for s in history["stages"]), 1)
    history["final_loss"] = stage["final_loss"]
    (out / "training.json").write_text(json.dumps(history, indent=1) + "\n")
    if not writes_into_assets(out):
        torch.save(opt.state_dict(), out / OPTIMIZER_FILE)


if __name__ == "__main__":
    main()
