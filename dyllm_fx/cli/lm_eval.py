"""``dyllm-lm-eval``: lm-eval's command line with the ``dyllm`` model registered.

lm-eval discovers no third-party models, so this registers ours and then runs lm-eval's own
command line with every argument unchanged::

    dyllm-lm-eval --model dyllm --model_args pretrained=default,policy=dual_cache --tasks TASK
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``lm_eval`` with ``argv`` (default: this process's arguments)."""
    from lm_eval.__main__ import cli_evaluate

    from ..eval import lm_eval_adapter  # noqa: F401  (registers the "dyllm" model)

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
