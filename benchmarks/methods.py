"""Every method on the embedded trained model, side by side.

    python benchmarks/methods.py --n 16 --json methods.json --plot methods.png

Prints one markdown table: accuracy (exact match on held-out prompts of the task suite),
tokens/s, speedup over vanilla measured in the same run, average active fraction, NFE per
batch, agreement with vanilla's tokens. Same as ``dyllm bench``.
"""

from __future__ import annotations

import sys

from dyllm_fx.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
