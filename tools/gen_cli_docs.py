"""Write docs/cli.md, the command reference, from the click commands' own --help.

    python3 tools/gen_cli_docs.py            # rewrite docs/cli.md
    python3 tools/gen_cli_docs.py --check    # exit 1 if docs/cli.md is out of date

The text comes from :func:`gradindex.cli.help_docs.render_markdown` (fixed width, so the output does not
depend on the terminal); ``tests/test_docs.py`` runs the same comparison.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gradindex.cli.help_docs import render_markdown  # noqa: E402

TARGET = ROOT / "docs" / "cli.md"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when docs/cli.md differs")
    args = parser.parse_args()
    text = render_markdown()
    current = TARGET.read_text(encoding="utf-8") if TARGET.exists() else None
    if args.check:
        if current != text:
            print(f"{TARGET.relative_to(ROOT)} is out of date: run python3 tools/gen_cli_docs.py", file=sys.stderr)
            return 1
        return 0
    if current != text:
        TARGET.write_text(text, encoding="utf-8")
        print(f"wrote {TARGET.relative_to(ROOT)}")
    else:
        print(f"{TARGET.relative_to(ROOT)} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
