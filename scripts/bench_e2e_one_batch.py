"""Run SGLang's bench_one_batch with the PSA plugin loaded.

`python -m sglang.bench_one_batch` never calls load_plugins(), so `--attention-backend psa` would
be rejected by argparse; this wrapper loads plugins first and then hands argv to SGLang unchanged.
Keep --tp-size 1: bench_one_batch's tp>1 workers are spawned without plugins.
"""

from __future__ import annotations

import sys

from sglang.srt.plugins import load_plugins

if __name__ == "__main__":
    load_plugins()
    from sglang.benchmark.one_batch import cli_main

    sys.exit(cli_main())
