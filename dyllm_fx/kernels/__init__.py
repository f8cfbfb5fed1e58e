"""Triton kernels and their plain-torch references, and the ops the compiler and runtime call.

One module per kernel, its plain-torch reference beside it; ``dispatch`` registers them as the
``torch.ops.dyllm.*`` ops (reference on CPU, Triton on CUDA):

* ``cache_scatter``: row scatter into the K/V and hidden-state caches (``dyllm::cache_write_rows``);
* ``partial_attention``: flash-style attention of the active rows over all cached keys, with
  optional softmax statistics (``dyllm::partial_attention``, ``dyllm::partial_attention_stats``);
* ``approx_attention``: DyLLM's approximate attention with saliency (``dyllm::approx_attention``);
* ``salient_rows``: the per-row context cosine from ``approx_attention``'s summable statistics.

The MLP and the Q/K/V/O projections of the active rows have no kernel of their own, by decision:
the passes gather the rows (``gather_rows``) in front of the model's own layers, so the GEMMs run
on cuBLAS or the compiler's tuned templates and inductor fuses the gather into the surrounding
elementwise kernels. A fused gather-GEMM-scatter kernel would save one read and one write of the
(A, D) activations; it belongs on the hot path only once it has been timed against that on a GPU.
"""
