"""Tensor parallelism, as a pass before capture: shard a model's blocks over the ranks of a
process group, so that the captured step is this rank's shard with one all-reduce after each
attention and MLP block.

Each block class names its plan (``tp_plan``, Megatron's layout, the names transformers' tensor
parallel plans and vLLM use):

* ``"colwise"``: q/k/v and the MLP's gate/up projections keep 1/N of their output features (the
  rank's heads, its slice of the MLP);
* ``"rowwise"``: the attention output and the MLP's down projection keep the matching 1/N of
  their input features; their partial outputs are summed over the ranks
  (:class:`RowParallelLinear`; rank 0 holds the bias, so the sum adds it once);
* ``"experts"``: a mixture of experts names the dim of each parameter to split (``tp_split``:
  every expert's intermediate features; the router whole) and sums its output over the ranks
  through its ``reduce``;

and its head counts (``tp_heads``), divided by N. When the model's LM head is its own (not tied
to the embedding) and the vocabulary divides by N, the token embedding
(:class:`VocabParallelEmbedding`) and the LM head (column-parallel: each rank's logits are its
slice of the vocabulary) are split over the vocabulary; the sampler then takes its decisions
from values reduced over the ranks (``dyllm_fx/vocab_parallel.py``), so every rank takes them
alike. The norms stay whole on every rank.

Sharding happens before capture rather than on the captured graph: the trace then sees the
shard's own shapes (``view(B, L, H / N, d)``) and needs no rewriting of size constants, and the
all-reduce is a graph op (torch.distributed's functional collectives) that every later pass and
``torch.compile`` keep. :func:`collective_group` reads the group back from the captured graph,
so the step program knows it is a shard (policies then sum their per-row statistics over the
ranks: DyLLM's cosine, dLLM-Cache's value similarity).
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import functools

import torch
import torch.nn.functional as F
from torch import fx, nn

from dyllm_fx.distributed import sum_over_shards
from dyllm_fx.errors import UsageError
from dyllm_fx.vocab_parallel import VocabShard

ALL_REDUCE = "_c10d_functional.all_reduce"


class RowParallelLinear(nn.Module):
    """``linear(x)`` with the input features split over the ranks: this rank's partial product,
    summed over ``group``. Rank 0 alone holds the bias, inside its own ``linear``, so the sum
    adds it once and the block keeps its traced form ``h + sum(linear(...))`` (a bias added
    after the sum would read to the block matcher as a residual stream)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group: str):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum_over_shards(F.linear(x, self.weight, self.bias), self.group)


class VocabParallelEmbedding(nn.Embedding):
    """An embedding whose rows (the vocabulary) are split over the ranks: each rank looks up the
    ids in its own range and gives zeros for the others, and the sum over the ranks is the whole
    lookup, exactly (one term of each sum is not zero). ``num_embeddings`` is the whole
    vocabulary (the ids it takes); ``weight`` holds this rank's rows from ``start``."""

    def __init__(self, weight: torch.Tensor, start: int, num_embeddings: int, group: str):
        nn.Module.__init__(self)  # nn.Embedding's own __init__ would allocate the whole table
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.num_embeddings, self.embedding_dim = num_embeddings, weight.shape[1]
        self.padding_idx, self.max_norm, self.norm_type = None, None, 2.0
        self.scale_grad_by_freq, self.sparse = False, False
        self.start = start
        self.group = group

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        inside = (local >= 0) & (local < self.weight.shape[0])
        rows = F.embedding(torch.where(inside, local, 0), self.weight)
        return sum_over_shards(torch.where(inside.unsqueeze(-1), rows, 0.0), self.group)

    def extra_repr(self) -> str:
        return f"rows {self.start}..{self.start + self.weight.shape[0] - 1} of {self.num_embeddings}"


def _slice(t: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    n = t.shape[dim] // size
    return t.narrow(dim, rank * n, n).clone()


def _colwise(lin: nn.Linear, rank: int, size: int) -> nn.Linear:
    out = nn.Linear(lin.in_features, lin.out_features // size, bias=lin.bias is not None, device="meta")
    out.weight = nn.Parameter(_slice(lin.weight.detach(), 0, rank, size), requires_grad=False)
    if lin.bias is not None:
        out.bias = nn.Parameter(_slice(lin.bias.detach(), 0, rank, size), requires_grad=False)
    return out


def _rowwise(lin: nn.Linear, rank: int, size: int, group: str) -> RowParallelLinear:
    bias = None if lin.bias is None or rank != 0 else lin.bias.detach().clone()
    return RowParallelLinear(_slice(lin.weight.detach(), 1, rank, size), bias, group)


def _split_experts(moe: nn.Module, rank: int, size: int, group: str) -> None:
    for name, dim in moe.tp_split.items():
        setattr(
            moe, name, nn.Parameter(_slice(getattr(moe, name).detach(), dim, rank, size), requires_grad=False)
        )
    moe.reduce = functools.partial(sum_over_shards, group=group)


def _plan(block: nn.Module) -> tuple[dict[str, str], tuple[str, ...]]:
    plan = getattr(type(block), "tp_plan", None)
    if not plan:
        raise UsageError(
            f"{type(block).__name__} has no tensor-parallel plan: tensor_parallel_size > 1 supports "
            "dyllm-fx's own model classes (LLaDA, Dream; dyllm_fx.load); run other models with "
            "tensor_parallel_size=1"
        )
    return plan, tuple(getattr(type(block), "tp_heads", ()))


def check_shardable(model: nn.Module, size: int) -> None:
    """Refuse, before any work, a model whose heads, KV heads or layer widths do not divide by
    ``size``, naming the number and the fix."""
    for index, block in enumerate(_blocks(model)):
        _, heads = _plan(block)
        for attr in heads:
            count = getattr(block, attr)
            if count % size:
                raise UsageError(
                    f"block {index}: {attr}={count} does not divide by tensor_parallel_size={size}; "
                    f"pick a size that divides the model's heads and KV heads"
                )
        for name, module, style in _sharded(block):
            if style == "experts":
                width, what = module.gate_proj.shape[module.tp_split["gate_proj"]], "experts' intermediate"
            elif style == "colwise":
                width, what = module.out_features, "output"
            else:
                width, what = module.in_features, "input"
            if width % size:
                raise UsageError(
                    f"block {index}: {name} has {width} {what} features, which do not divide by "
                    f"tensor_parallel_size={size}"
                )


def _blocks(model: nn.Module) -> nn.ModuleList:
    parts = getattr(model, "parts", None)
    if parts is None:
        raise UsageError(
            f"{type(model).__name__} cannot be sharded: tensor_parallel_size > 1 supports dyllm-fx's own "
            "model classes (LLaDA, Dream; dyllm_fx.load)"
        )
    return parts().blocks


def _sharded(block: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(name, module, style) of every module the block's plan splits. An ``"experts"`` entry
    matches a mixture of experts only (``tp_split``): a dense layer's MLP of the same name is a
    plain container, split by its own colwise / rowwise entries."""
    plan, _ = _plan(block)
    return [
        (name, module, style)
        for pattern, style in plan.items()
        for name, module in block.named_modules()
        if name and fnmatch.fnmatchcase(name, pattern) and (style != "experts" or hasattr(module, "tp_split"))
    ]


def _replace(block: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, leaf, module)


def shard_model(model: nn.Module, rank: int, size: int, group: str) -> nn.Module:
    """A copy of ``model`` holding this rank's shard of every block (``model`` is not changed);
    ``model`` itself when it already is this rank's shard (``dyllm_fx.load(...,
    tensor_parallel_size=N)`` reads only the shard's slices). The shard records
    ``tensor_parallel = (rank, size, group)``."""
    done = getattr(model, "tensor_parallel", None)
    if done is not None:
        if done != (rank, size, group):
            raise UsageError(
                f"the model is already shard {done[0]} of {done[1]}; load it again for "
                f"tensor_parallel_size={size}"
            )
        return model
    check_shardable(model, size)
    sharded = copy.deepcopy(model)
    for block in _blocks(sharded):
        for name, module, style in _sharded(block):
            if style == "experts":
                _split_experts(module, rank, size, group)
            elif style == "colwise":
                _replace(block, name, _colwise(module, rank, size))
            else:
                _replace(block, name, _rowwise(module, rank, size, group))
        for attr in _plan(block)[1]:
            setattr(block, attr, getattr(block, attr) // size)
    _shard_vocabulary(sharded, rank, size, group)
    sharded.tensor_parallel = (rank, size, group)
    return sharded


def _shard_vocabulary(model: nn.Module, rank: int, size: int, group: str) -> None:
    """Split the token embedding and the LM head over the vocabulary, when the head is its own
    (a tied head reads the embedding's every row: both stay whole) and the vocabulary divides by
    ``size``. The head's logits are then this rank's columns: the model's ``diffusion`` spec
    records which (``vocab_shard``), so the sampler reduces over the ranks what it reads."""
    parts = model.parts()
    embedding, head = parts.embedding, parts.head
    if head is None or not isinstance(embedding, nn.Embedding) or embedding.num_embeddings % size:
        return
    rows = embedding.num_embeddings // size
    weight = _slice(embedding.weight.detach(), 0, rank, size)
    split = VocabParallelEmbedding(weight, rank * rows, embedding.num_embeddings, group)
    _replace(model, _name_of(model, embedding), split)
    if not isinstance(head, nn.Linear) or head.out_features % size:
        return
    _replace(model, _name_of(model, head), _colwise(head, rank, size))
    cols = head.out_features // size
    shard = VocabShard(rank * cols, cols, head.out_features, group)
    model.diffusion = dataclasses.replace(model.diffusion, vocab_shard=shard)


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def collective_group(graph: fx.Graph) -> str | None:
    """The process group the graph's all-reduces run over (None: not a sharded graph)."""
    for node in graph.nodes:
        if node.op == "call_function" and str(node.target).startswith(ALL_REDUCE):
            return node.args[2]
    return None


__all__ = [
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "check_shardable",
    "collective_group",
    "shard_model",
]
