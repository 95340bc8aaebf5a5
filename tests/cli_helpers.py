"""Assertions about the command line's output shared by the CLI tests."""

from __future__ import annotations


def one_line_error(result, *fragments: str) -> str:
    """``result`` (click's ``Result``) ended with exit status 2 and one ``error: …`` line on stderr holding
    every fragment; that line."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
