"""Per-model defaults of the methods, where the official code sets them per model.

``make_policy(name, family=...)`` fills in these values for the parameters the caller did not
set; ``family`` is "llada" or "dream" (``dyllm_fx.transform`` reads it from the model's
diffusion spec) or "diffusion_gemma" (transformers' block-diffusion model). Each entry names where the
official code sets it.
"""

from __future__ import annotations

PRESETS: dict[str, dict[str, dict]] = {
    # DyLLM (scale-snu/DyLLM): Config.threshold / eval.py --threshold 0.99 (LLaDA runs);
    # run.py builds the Dream engine with threshold=0.995.
    # DiffusionGemma: engine/model_runner.py _FULL_STEPS = 2 ("first denoise steps of a canvas
    # run dense"); README: threshold "such as 0.99".
    "dyllm": {
        "llada": {"tau": 0.99},
        "dream": {"tau": 0.995},
        "diffusion_gemma": {"tau": 0.99, "num_full_steps": 2},
    },
    # ES-dLLM (zhuzj19/ES-dLLM): scripts/eval_instruct*.sh, gsm8k rows: prompt_update_freq 64,
    # block_update_freq 16 for LLaDA-Instruct and 8 for Dream-Instruct. The skip layout is
    # given by depth fraction, so it already scales with the layer count (32 LLaDA layers:
    # 4 and 8; 28 Dream layers: 4 and 7).
    "es_dllm": {
        "llada": {"prompt_update_freq": 64, "block_update_freq": 16},
        "dream": {"prompt_update_freq": 64, "block_update_freq": 8},
    },
}

FAMILIES = ("llada", "dream", "diffusion_gemma")


def preset(name: str, family: str | None) -> dict:
    """The preset parameters of policy ``name`` for a model ``family`` ({} when none)."""
    if family is None:
        return {}
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; presets exist for {FAMILIES}")
    return dict(PRESETS.get(name, {}).get(family, {}))


def family_of(spec) -> str | None:
    """The family: "dream" for models with Dream's shifted logits, "llada" for the others; None
    without a spec."""
    if spec is None:
        return None
    return "dream" if getattr(spec, "logits_shift", 0) else "llada"
