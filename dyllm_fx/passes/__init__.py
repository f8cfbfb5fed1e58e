"""torch.fx passes that rewrite a dLLM into a cache-backed sparse step.

Capture is the model adapter's (``dyllm_fx.adapters``: what to trace); the rest run in this
order as one pipeline object (``pipeline.py``: ``PASSES.run(captured, example_inputs)``):

    1 capture              one denoising forward as a symbolic aten graph
    2 check_bidirectional  refuse causal attention (rewrites nothing)
    3 find_blocks          the transformer blocks, from the graph's data flow
    4 split_pieces         prologue | attn_i | mlp_i | epilogue, each on a subset of rows
    5 split_attention      each attn_i also cut at its core into query | kv | post
    6 rewrite_attention    each core into cache writes + partial attention

``matching.py`` holds the op sets and node predicates the passes match on;
``attention_operands.py`` reads an attention core's operands (and a key prefix) for passes 4-6.
"""
