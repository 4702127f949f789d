"""One rank of the hub-snapshot agreement test (tests/test_sharded_load.py).

argv[1] is JSON: {"repo": hub id, "caches": [a Hugging Face cache per rank], "out": dir}. Each rank reads the hub
model from its own cache (as ranks of one job may see the repo at two commits, when it changes while they start),
through :func:`dist_lora.model.base_directory`, and writes out/rank{r}.json: the directory it got, or the error
(class and message) it raised.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from huggingface_hub import constants

from dist_lora.distributed import init_distributed, shutdown
from dist_lora.model import base_directory


def main() -> None:
    args = json.loads(sys.argv[1])
    rank, _, _ = init_distributed(timeout_s=30)  # a rank left waiting fails in seconds, not in 30 minutes
    constants.HF_HUB_CACHE = args["caches"][rank]
    try:
        result = {"directory": base_directory(args["repo"])}
    except Exception as e:
        result = {"error": type(e).__name__, "message": str(e)}
    (Path(args["out"]) / f"rank{rank}.json").write_text(json.dumps(result))
    shutdown()


if __name__ == "__main__":
    main()
