"""The one definition of "the same answer" used by every test that says two paths answer alike (served
batches vs the CLI, S3 vs a local store, Ray vs one process, a store before and after a crash).

Two answers to the same queries are the same when, query by query (docs/same-answer.md):
- scores: ``|got - want| <= RTOL * scale`` rank by rank, ``scale`` the query's largest ``|want|`` score
  (float32 sums of the same terms in another order — another CPU's kernels, another batch
  composition, another thread count — differ by a few ulps of the largest terms, not of each score);
- ranking: rank by rank the same sample id, except among near-ties: a different id is allowed at a rank
  only where the reference holds that id at a score within the same tolerance of the rank's score, or,
  for an id the reference did not return, where the rank's score ties with the reference's last one
  (the tie may continue past k); no id twice;
- everything else an answer says about a sample (its metadata, the query's index) is equal exactly; a
  result's ``rank`` is its position.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: relative tolerance of scores (relative to the query's largest |score|); see docs/same-answer.md
RTOL = 1e-4


def ranking_differences(got_ids: Sequence[int], got_scores: Sequence[float], want_ids: Sequence[int],
                        want_scores: Sequence[float], rtol: float = RTOL) -> list[str]:
    """Why one query's ``(ids [k], scores [k])`` is not the same answer as the reference; [] when it is."""
    got_ids, want_ids = np.asarray(got_ids), np.asarray(want_ids)
    got_scores, want_scores = np.asarray(got_scores, np.float64), np.asarray(want_scores, np.float64)
    if got_ids.shape != want_ids.shape or got_scores.shape != want_scores.shape:
        return [f"shapes differ: {got_ids.shape} vs {want_ids.shape}"]
    if not np.isfinite(got_scores[got_ids >= 0]).all() or not np.isfinite(want_scores[want_ids >= 0]).all():
        return ["a score is not finite"]
    valid = want_scores[want_ids >= 0]
    tolerance = rtol * (np.abs(valid).max() if len(valid) else 0.0) + 1e-30
    problems = []
    if len(set(got_ids[got_ids >= 0].tolist())) != int((got_ids >= 0).sum()):
        problems.append(f"an id appears twice: {got_ids.tolist()}")
    reference = dict(zip(want_ids.tolist(), want_scores.tolist()))
    last = valid[-1] if len(valid) else 0.0
    for rank, (mine, theirs) in enumerate(zip(got_ids.tolist(), want_ids.tolist())):
        if (mine < 0) != (theirs < 0):
            problems.append(f"rank {rank}: id {mine} vs {theirs} (one is padding)")
            continue
        if mine < 0:
            continue
        if abs(got_scores[rank] - want_scores[rank]) > tolerance:
            problems.append(f"rank {rank}: score {got_scores[rank]!r} vs {want_scores[rank]!r} (tolerance {tolerance:.3g})")
        if mine != theirs:
            tied = reference[mine] if mine in reference else last
            if abs(tied - want_scores[rank]) > tolerance:
                problems.append(f"rank {rank}: id {mine} vs {theirs}, not a near-tie")
    return problems


def assert_same_ranking(got_ids, got_scores, want_ids, want_scores, rtol: float = RTOL) -> None:
    """``[n, k]`` sample ids and scores of two paths: the same answer for every query (module docstring)."""
    got_ids, want_ids = np.atleast_2d(got_ids), np.atleast_2d(want_ids)
    got_scores, want_scores = np.atleast_2d(got_scores), np.atleast_2d(want_scores)
    assert got_ids.shape == want_ids.shape, (got_ids.shape, want_ids.shape)
    for q in range(len(want_ids)):
        problems = ranking_differences(got_ids[q], got_scores[q], want_ids[q], want_scores[q], rtol)
        assert not problems, f"query {q}: " + "; ".join(problems)


def same_ranking(got, want, rtol: float = RTOL) -> bool:
    """``got``, ``want``: ``(sample_ids [n, k], scores [n, k])`` pairs; whether they are the same answer."""
    try:
        assert_same_ranking(got[0], got[1], want[0], want[1], rtol)
    except AssertionError:
        return False
    return True


def assert_same_answers(got: list[dict], want: list[dict], rtol: float = RTOL) -> None:
    """Two lists of JSON answers (``{"query", "results": [{"sample_id", "score", ...}]}``, as ``query --json``
    prints them and ``/v1/attribute`` returns them) are the same answer (module docstring)."""
    assert [{k: v for k, v in q.items() if k != "results"} for q in got] == \
        [{k: v for k, v in q.items() if k != "results"} for q in want]
    for number, (mine, theirs) in enumerate(zip(got, want)):
        mine_ids = [r["sample_id"] for r in mine["results"]]
        their_ids = [r["sample_id"] for r in theirs["results"]]
        assert len(mine_ids) == len(their_ids), (number, mine_ids, their_ids)
        problems = ranking_differences(mine_ids, [r["score"] for r in mine["results"]], their_ids,
                                       [r["score"] for r in theirs["results"]], rtol)
        assert not problems, f"answer {number}: " + "; ".join(problems)
        assert [r.get("rank", i + 1) for i, r in enumerate(mine["results"])] == list(range(1, len(mine_ids) + 1))
        described = {r["sample_id"]: {k: v for k, v in r.items() if k not in ("score", "rank")}
                     for r in theirs["results"]}
        for result in mine["results"]:
            if result["sample_id"] in described:
                assert {k: v for k, v in result.items() if k not in ("score", "rank")} == \
                    described[result["sample_id"]]
