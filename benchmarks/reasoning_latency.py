"""Reasoning latency and memory, transformers' generate against the fast path.

`python benchmarks/reasoning_latency.py [options]` is `python -m thinkdiff_core bench [options]`; see
`--help` and benchmarks/RESULTS.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from thinkdiff_core.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
