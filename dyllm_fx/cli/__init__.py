"""The command lines: ``dyllm`` (``main.py``, one module per subcommand beside it) and
``dyllm-lm-eval`` (``lm_eval.py``).

Nothing here imports torch at module level, so ``--help`` answers at once.
"""
