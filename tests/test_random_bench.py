"""``dyllm bench --model <family>:random`` (dyllm_fx/eval/random_bench.py): the registry of random
models, each family's exact rows (dense and DyLLM with every row salient give the untransformed
model's tokens), the refusals, and the command line. Tiny sizes: the figures are not checked."""

from __future__ import annotations

import json

import pytest

from dyllm_fx.cli.main import main
from dyllm_fx.errors import UsageError
from dyllm_fx.eval.random_bench import (
    FAMILIES,
    RandomMethod,
    build_random_model,
    default_methods,
    family_of,
    format_random_table,
    run_random_bench,
)

TINY = dict(vocab=48, hidden=32, layers=2, heads=4, mlp=64)


LOOP_FAMILIES = ["llada", "dream", "llada_moe", "mmada"]


def _rows(name: str, labels: tuple[str, ...]):
    family = family_of(f"{name}:random")
    model = build_random_model(family, seed=1, **TINY)
    methods = [m for m in default_methods(tau=0.5) if m.label in labels]
    rows = run_random_bench(family, methods, n=2, prompt_length=6, gen_length=8, block_length=4, model=model)
    assert [r.method for r in rows] == [m.label for m in methods]
    assert all(r.tokens_per_s > 0 and r.nfe == 8 and r.refused is None for r in rows)
    return {r.method: r for r in rows}


@pytest.mark.parametrize("name", LOOP_FAMILIES)
def test_dense_gives_each_familys_untransformed_tokens(name):
    rows = _rows(name, ("untransformed", "dense"))
    assert rows["untransformed"].speedup == 1.0 and rows["dense"].agreement == 1.0
    table = format_random_table(list(rows.values()), name)
    assert table.startswith(f"{name}:random\n") and "no accuracy" in table


@pytest.mark.slow  # about 10 s a family on the shared 2-core machine: a trace per policy
@pytest.mark.parametrize("name", LOOP_FAMILIES)
def test_every_row_dyllm_is_exact_and_the_caches_skip_rows(name):
    rows = _rows(name, ("untransformed", "dual_cache+dyllm", "dyllm: every row salient"))
    assert rows["dyllm: every row salient"].agreement == 1.0
    assert rows["dual_cache+dyllm"].active_fraction < 1.0


def test_llada2_decodes_in_its_blocks_and_the_exact_methods_keep_its_tokens():
    """LLaDA2's row runs the published block loop (one prompt at a time, the model's blocks of
    8 here); dense, its exact dual cache and DyLLM with every row salient agree fully."""
    family = family_of("llada2:random")
    model = build_random_model(family, seed=1, **TINY)
    exact = ("dense", "dual_cache", "dyllm: every row salient")
    methods = [m for m in default_methods() if m.label in ("untransformed", *exact)]
    rows = {
        r.method: r
        for r in run_random_bench(family, methods, n=2, prompt_length=6, gen_length=16, model=model)
    }
    assert all(r.refused is None and r.nfe >= 2 for r in rows.values())  # two blocks at least a step each
    assert [rows[label].agreement for label in exact] == [1.0] * 3


def test_the_registry_names_every_family_and_refuses_the_missing_ones():
    assert set(FAMILIES) >= {"llada", "dream", "llada_moe", "mmada", "diffusion_gemma", "llada2"}
    assert family_of("default") is None and family_of("/models/LLaDA-8B") is None
    with pytest.raises(UsageError, match="no random model 'gpt2:random'.*llada:random"):
        family_of("gpt2:random")
    assert all(family.build is not None for family in FAMILIES.values())


def test_a_method_the_family_cannot_run_is_a_row_that_says_why():
    from dyllm_fx.eval.diffusion_gemma_bench import default_methods as gemma_methods
    from dyllm_fx.models.diffusion_gemma import random_model

    model = random_model(seed=0)  # the tests' tiny DiffusionGemma config
    methods = [m for m in gemma_methods() if m.label in ("untransformed", "es_dllm")]
    rows = run_random_bench(FAMILIES["diffusion_gemma"], methods, n=2, gen_length=8, steps=2, model=model)
    assert rows[1].refused and "no mask token" in rows[1].refused
    assert "es_dllm" in format_random_table(rows) and "refused: es_dllm scores rows" in format_random_table(
        rows
    )


def test_first_method_must_be_untransformed():
    with pytest.raises(ValueError, match="untransformed"):
        run_random_bench(FAMILIES["llada"], [RandomMethod("dense", "dense")])


def test_cli_bench_on_a_random_family(tmp_path, capsys):
    out = tmp_path / "rows.json"
    argv = ["bench", "--model", "mmada:random", "--n", "1", "--gen-length", "4", "--block-length", "4"]
    assert main([*argv, "--methods", "dense", "--json", str(out)]) == 0
    assert [r["method"] for r in json.loads(out.read_text())] == ["untransformed", "dense"]
    assert "mmada:random" in capsys.readouterr().out
    assert main(["bench", "--model", "dream:random", "--plot", "x.png"]) == 2
    assert "no accuracy" in capsys.readouterr().err
