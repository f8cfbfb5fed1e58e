"""Triton kernels and their plain-torch references, and the ops the compiler and runtime call.

One module per kernel, its plain-torch reference beside it; ``dispatch`` registers them as the
``torch.ops.dyllm.*`` ops (reference on CPU, Triton on CUDA):

* ``cache_scatter``: row scatter into the K/V and hidden-state caches (``dyllm::cache_write_rows``);
* ``partial_attention``: flash-style attention of the active rows over all cached keys, with
  optional softmax statistics (``dyllm::partial_attention``, ``dyllm::partial_attention_stats``);
* ``salient_rows``: per-row context cosine and the compact salient-row list (``dyllm::saliency``);
* ``approx_attention``: DyLLM's approximate attention with saliency (``dyllm::approx_attention``);
* ``gathered_mlp``: the gathered projections stay in torch (why: its docstring).
"""
