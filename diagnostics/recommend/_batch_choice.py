"""One batch-size answer from the two kinds of evidence: the gradient noise scale of the run
(``batch_size_recommendation``) and the critical batch fitted to branches at several batch sizes
(``critical_batch_recommendation``; docs/recommendations.md, "One batch size from both").

The rule, in order:

0. Branches compared at equal tokens (``equal_tokens_recommendation``: the largest swept batch whose final
   loss is within noise of the best, Merrill et al.'s critical batch) are followed first: every branch of
   a sweep trains the same tokens, so this is the question "how large can the batch be without losing loss
   for my token budget" answered by measurement. McCandlish et al.'s B_crit (below) is quoted beside it: it
   balances steps against tokens (at B_crit a run needs twice the minimal steps and twice the minimal
   tokens), so it is the answer when steps (wall-clock) matter more than tokens, and is worse at equal
   tokens by construction.
1. Branches that give a critical batch are followed: they measured the validation loss itself at
   each batch size, while the noise scale is a model of it, and under Adam B_simple is known to sit
   far below the empirical critical batch (Merrill et al. 2025, arXiv 2505.23971). When both describe
   the same phase and sequence length the text says how far apart they are; when they describe
   different phases it says so: the answer holds for the branches' phase, and the noise scale's value
   is quoted for its own phase as a lower bound, with the sweep that would check it.
2. Without a critical batch from the branches (too few reached the target, ...) the noise scale is
   followed, and the text says why the branches could not be used.
3. Neither: ``RecommendationError`` with both reasons.

The patch of a branch-based answer is the branch that tested it: from the branch point on, every phase
of the branches' sequence length runs at the batch with the same tokens and the LR x sqrt(k)
(``rescale_phase``, as ``midtrain sweep`` builds its branches).
"""

from __future__ import annotations

import math
from dataclasses import replace

from diagnostics.recommend._common import (Recommendation, RecommendationError, _fmt, _phase_table, _runnable_batch,
                                           rescale_phase)

__all__ = ["combined_batch_recommendation"]

MERRILL = ("under Adam the gradient noise scale is known to sit far below the empirical critical batch "
           "(Merrill et al. 2025, arXiv 2505.23971)")


def _where(rec: Recommendation) -> str:
    phase, seq = rec.evidence.get("phase"), rec.evidence.get("seq_len")
    if phase is None and seq is None:
        return "an unnamed phase"
    return (f"phase {phase!r}" if phase is not None else "its phase") + (f" at seq_len {seq}" if seq else "")


def _branch_patch(run, value: int, step: int | None) -> tuple[dict, int | None]:
    """(patch, accum) running ``value`` from the phase holding ``step`` on, over its sequence length."""
    table = _phase_table(run) if run is not None else []
    here = next(((n, s, e, p) for n, s, e, p in table if s <= (step or 0) < e), None)
    if here is None or step is None or not here[3].get("batch_size"):
        return {}, None
    world = int((run.info or {}).get("world_size") or 1)
    _, accum, _ = _runnable_batch(value, here[3], float(here[3]["batch_size"]), world, 1.0)
    seq = here[3].get("seq_len")
    phases = {n: rescale_phase(p, value, accum, done=step - s if n == here[0] else 0)
              for n, s, e, p in table if s >= here[1] and p.get("seq_len") == seq}
    return {"phases": phases}, accum


def combined_batch_recommendation(run, gns: Recommendation | str, branches: Recommendation | str,
                                  equal: Recommendation | str | None = None) -> Recommendation:
    """The one ``batch_size`` recommendation when branches were given (module docstring: the rule).

    gns: the noise-scale recommendation, or why it is not available; branches: the critical-batch
    recommendation (McCandlish B_crit), or why it is not available; equal: the equal-token comparison of the
    same branches (``equal_tokens_recommendation``), or why not, or None. run: the parent (its config builds
    the patch).
    """
    if isinstance(equal, Recommendation):
        return _follow_equal_tokens(run, gns, branches, equal)
    if isinstance(gns, str) and isinstance(branches, str):
        raise RecommendationError(f"no batch-size evidence: gradient noise scale: {gns}; branches: {branches}")
    if isinstance(branches, str):
        ev = {"follows": "the gradient noise scale",
              "why": f"the branches give no critical batch ({branches})", **gns.evidence}
        return replace(gns, evidence=ev, summary=f"follows the gradient noise scale (the branches give no critical "
                       f"batch: {branches[:120]}); for {_where(gns)}: " + gns.summary)
    where_b = _where(branches)
    if isinstance(gns, str):
        why = f"the branches measured the loss directly; the gradient noise scale is not available ({gns})"
        extra = {}
    else:
        same = (gns.evidence.get("phase"), gns.evidence.get("seq_len")) == (
            branches.evidence.get("phase"), branches.evidence.get("seq_len"))
        ratio = branches.estimate / gns.estimate if gns.estimate > 0 else math.nan
        if same:
            agree = ("they agree within 2x" if 0.5 <= ratio <= 2 else
                     f"they disagree: B_crit is {_fmt(ratio)}x B_simple")
            why = (f"both describe {where_b}; the branches measured the loss directly there and win; {agree} "
                   f"({MERRILL})")
        else:
            why = (f"they are for different phases: the branches for {where_b}, the noise scale for {_where(gns)}; "
                   f"this answer holds for {where_b}. For {_where(gns)} the noise scale points to "
                   f"{_fmt(gns.value)} sequences, a lower bound ({MERRILL}): check it with `midtrain sweep RUN "
                   f"--step S --batch-sizes ...` from a checkpoint in that phase")
        extra = {"gradient noise scale": f"{_fmt(gns.value)} sequences (B_simple {_fmt(gns.estimate)}) for "
                                          f"{_where(gns)}", "B_crit / B_simple": ratio}
    value = int(branches.value)
    extra["branches"] = f"{value} sequences (B_crit {_fmt(branches.estimate)}) for {where_b}"
    return _follow(run, branches, value, "the branches (critical batch)", why, extra,
                   f"follows the branches: {value} sequences for {where_b}",
                   "end no worse than the best branch of the sweep (within seed noise)",
                   ["a sweep at a later checkpoint (the critical batch grows as the loss falls): see batch_schedule"])


def _follow(run, src: Recommendation, value: int, follows: str, why: str, extra: dict, head: str, expect: str,
            would_change: list) -> Recommendation:
    """The ``batch_size`` answer following the branch-based ``src`` at ``value``: its patch is the branch the
    sweep trained at that batch (``_branch_patch``); ``head`` opens the summary, ``expect`` ends the check."""
    patch, _ = _branch_patch(run, value, src.branch_step)
    evidence = {"phase": src.evidence.get("phase"), "seq_len": src.evidence.get("seq_len"), "follows": follows,
                "why": why, **extra}
    evidence.update({k: v for k, v in src.evidence.items() if k not in evidence})
    check = ("midtrain recommend RUN --branches ... --write-config rec.toml, then midtrain train --from RUN "
             f"--step {src.branch_step} --config rec.toml --out RUN-bs{value}: at equal tokens it should {expect}"
             if patch else "")
    return Recommendation(
        name="batch_size", value=float(value), unit="sequences per optimizer step", low=src.low, high=src.high,
        level=src.level, estimate=src.estimate, summary=f"{head}. Why: {why}.", evidence=evidence,
        assumptions=src.assumptions + [
            "the patch runs the batch from the branch point with the same tokens per phase and the LR x sqrt(k) "
            "(the sweep's rule): it is the branch the sweep would train at this batch"],
        would_change=src.would_change + would_change,
        patch=patch, check=check, branch_step=src.branch_step if patch else None)


def _gns_note(gns: Recommendation | str, where: str, rec: Recommendation) -> tuple[str, dict]:
    """How the noise scale relates to a branch-based answer for ``where``: (text, evidence)."""
    if isinstance(gns, str):
        return f"the gradient noise scale is not available ({gns})", {}
    same = (gns.evidence.get("phase"), gns.evidence.get("seq_len")) == (rec.evidence.get("phase"),
                                                                          rec.evidence.get("seq_len"))
    ratio = rec.value / gns.estimate if gns.estimate > 0 else math.nan
    text = (f"the noise scale, measured in the same phase, gives B_simple {_fmt(gns.estimate)} ({_fmt(ratio)}x "
            f"below this answer; {MERRILL})" if same else
            f"the noise scale was measured in {_where(gns)} and points to {_fmt(gns.value)} sequences there, a "
            f"lower bound ({MERRILL}); it does not apply to {where}: check it with `midtrain sweep RUN --step S "
            "--batch-sizes ... --seeds 0,1` from a checkpoint in that phase")
    return text, {"gradient noise scale": f"{_fmt(gns.value)} sequences (B_simple {_fmt(gns.estimate)}) for "
                                          f"{_where(gns)}"}


def _follow_equal_tokens(run, gns, branches, equal: Recommendation) -> Recommendation:
    """Rule 0: the largest batch within noise of the best at equal tokens."""
    where = _where(equal)
    value = int(equal.value)
    note, extra = _gns_note(gns, where, equal)
    if isinstance(branches, Recommendation):
        bc = (f"McCandlish et al.'s B_crit from the same branches is {_fmt(branches.estimate)} sequences: the batch "
              "that balances steps against tokens (twice the minimal steps and tokens), worth it when steps "
              "cost more than tokens, worse at equal tokens by construction")
        extra["B_crit (steps vs tokens)"] = (f"{_fmt(branches.estimate)} sequences, range {_fmt(branches.low)}-"
                                             f"{_fmt(branches.high)}")
    else:
        bc = f"McCandlish et al.'s B_crit is not available from these branches ({branches[:120]})"
    why = (f"the branches trained equal tokens and measured the loss itself: {value} is the largest swept batch "
           f"within noise of the best there (Merrill et al.'s critical batch). {bc}. And {note}")
    return _follow(run, equal, value, "the branches at equal tokens", why, extra,
                   f"follows the branches at equal tokens: {value} sequences for {where}",
                   "end within seed noise of the best branch of the sweep (train it with another --seed)",
                   ["steps (wall-clock) that cost more than tokens: then B_crit"])
