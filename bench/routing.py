"""The GPU check's "Routing" section: per bench case, what ``auto`` ran against the fastest option, and the rule to
re-tune where ``auto`` is slower.

Reads the bench records of the suites in :data:`ROUTED_SUITES` (``bench_<suite>.json``'s ``results``). A case
(op, case name, dtype) is listed when it has an ``auto`` row and one of our own paths besides it (a row that is
neither a PyTorch option, ``torch``, nor a row computing something else: the baseline, ``n/a`` rows so
marked). The ``auto`` row's ``pick`` (written by the suite: ``impl`` the row that runs the same kernels,
``rule`` / ``where`` the rule that chose it, optional ``detail``, ``same``, ``retune`` and ``static``; see
``bench/suites/depthwise_conv2d.py:pick_rows``) names the rule to change.
"""

from __future__ import annotations

ROUTED_SUITES = ("depthwise_conv2d", "kernelwarehouse")
SLOWER = 1.05                       # auto slower than the fastest option by more than this factor: flagged
USABLE_CHECKS = ("ok", "unchecked", "n/a")
OTHER_COMPUTATION = "computes something else"   # the harness's reason for an unchecked row that is no baseline


def _is_torch(rec: dict) -> bool:
    return rec.get("torch", rec["impl"].startswith("torch_"))


def _same_computation(rec: dict) -> bool:
    """A row that computes the case's result and ran without failing (an option auto could have taken)."""
    return rec.get("check") in USABLE_CHECKS and rec.get("reason") != OTHER_COMPUTATION


def _ms(rec: dict) -> float | None:
    ms = rec.get("ms")
    return float(ms) if isinstance(ms, (int, float)) and ms > 0 else None


def _fastest(rows: list[dict]) -> dict | None:
    timed = [r for r in rows if _ms(r) is not None]
    return min(timed, key=lambda r: r["ms"]) if timed else None


def _cases(records: list[dict]) -> dict[tuple, list[dict]]:
    """Records grouped by (op, case, dtype), in bench order."""
    out: dict[tuple, list[dict]] = {}
    for r in records:
        if "impl" in r and "case" in r:
            out.setdefault((r.get("op"), r["case"], r.get("dtype")), []).append(r)
    return out


def _picked(pick: dict | None) -> str:
    if not pick:
        return "? (pick not recorded)"
    impl = pick.get("impl") or "? (not yet measured)"
    detail = f" ({pick['detail']})" if pick.get("detail") else ""
    return f"{impl}{detail} · {pick.get('rule', '?')}"


def _option(rec: dict | None, auto_ms: float | None) -> str:
    if rec is None:
        return "-"
    ratio = f" ({rec['ms'] / auto_ms:.2f}x)" if auto_ms else ""
    return f"{rec['impl']} {rec['ms']:.4f}{ratio}"


def _rule_for(pick: dict, winner: str) -> str:
    """The rule whose change would give ``winner`` to auto, named with where it lives."""
    retune = pick.get("retune") or {}
    if winner in retune:
        return retune[winner]
    return f"{pick.get('rule', '?')} ({pick.get('where', '?')})"


def _advice(pick: dict | None, winner: dict, auto_ms: float) -> str:
    ratio = winner["ms"] / auto_ms
    if not pick:
        return f"{winner['impl']} {ratio:.2f}x of auto; rule unknown (no pick recorded)"
    if winner["impl"] == pick.get("impl") or winner["impl"] in (pick.get("same") or ()):
        return (f"{winner['impl']} runs auto's choice in {ratio:.2f}x of auto's time: overhead of the routing or "
                "timing noise, no rule to change")
    if pick.get("impl") is None:
        return f"{winner['impl']} {ratio:.2f}x of auto; auto's choice is not known ({pick.get('rule', '?')})"
    return f"{winner['impl']} {ratio:.2f}x of auto → {_rule_for(pick, winner['impl'])} would gain"


def _static_advice(static: dict | None, rows: dict[str, dict], best: dict) -> str | None:
    """Where the static rule (torch.compile tracing, autotuning off) picks a row > SLOWER x the fastest option."""
    if not isinstance(static, dict) or static.get("impl") not in rows or _ms(rows[static["impl"]]) is None:
        return None
    ms = _ms(rows[static["impl"]])
    if ms <= SLOWER * best["ms"] or best["impl"] == static["impl"] or best["impl"] in (static.get("same") or ()):
        return None
    return (f"static rule picks {static['impl']}, {ms / best['ms']:.2f}x the fastest ({best['impl']}) → "
            f"{_rule_for(static, best['impl'])} would gain")


def _case_row(label: str, dtype: str, recs: list[dict]) -> tuple[str, bool] | None:
    """The table row of one case and whether it is flagged; None when the case has no auto row next to our paths."""
    rows = {r["impl"]: r for r in recs}
    auto = rows.get("auto")
    ours = [r for r in recs if r["impl"] != "auto" and not _is_torch(r) and _same_computation(r)]
    if auto is None or not ours:
        return None
    pick = auto.get("pick") if isinstance(auto.get("pick"), dict) else None
    auto_ms = _ms(auto)
    fast_ours, fast_torch = _fastest(ours), _fastest([r for r in recs if _is_torch(r) and _same_computation(r)])
    best = _fastest([r for r in (fast_ours, fast_torch) if r is not None])
    notes, flagged = [], False
    if auto_ms is None:
        error = f": {auto['error'][:80]}" if auto.get("error") else ""
        notes.append(f"auto not timed ({auto.get('check', '?')}{error})")
    elif best is not None and auto_ms > SLOWER * best["ms"]:
        flagged = True
        notes.append(f"**auto {auto_ms / best['ms']:.2f}x the fastest**: {_advice(pick, best, auto_ms)}")
    elif best is not None:
        notes.append("auto fastest" if auto_ms <= best["ms"] else
                     f"auto within {100 * (auto_ms / best['ms'] - 1):.0f} % of {best['impl']}")
    if pick is None and auto.get("pick_error"):
        notes.append(f"pick failed: {auto['pick_error'][:80]}")
    static_note = _static_advice(pick.get("static"), rows, best) if best is not None and pick else None
    if static_note:
        notes.append(static_note)
    cells = [label, dtype, _picked(pick), f"{auto_ms:.4f}" if auto_ms else "-", _option(fast_ours, auto_ms),
             _option(fast_torch, auto_ms), "; ".join(notes) or "-"]
    return "| " + " | ".join(cells) + " |", flagged


def routing_section(suites: dict[str, list[dict]]) -> list[str]:
    """The "## Routing" section of summary.md as lines (a run cut short: whatever cases it has)."""
    lines = ["", "## Routing", ""]
    present = [s for s in ROUTED_SUITES if s in suites]
    if not present:
        return lines + [f"No bench results of {', '.join(ROUTED_SUITES)} (the bench stage did not run them, or was "
                        "cut short): nothing to re-tune."]
    table, flagged = [], 0
    for suite in present:
        for (op, case, dtype), recs in _cases(suites[suite]).items():
            row = _case_row(case if op in (None, suite) else f"{op}: {case}", str(dtype), recs)
            if row is not None:
                table.append(row[0])
                flagged += row[1]
    missing = [s for s in ROUTED_SUITES if s not in suites]
    if not table:
        lines.append("No case with an `auto` row next to our own paths (`auto` is benched on a GPU only): nothing to "
                     "re-tune.")
    else:
        lines.append(f"auto > {100 * (SLOWER - 1):.0f} % slower than the fastest option (ours or PyTorch's) in "
                     f"**{flagged} of {len(table)}** cases. Times: median ms; (Nx) = that time / auto's. A flagged "
                     "row names the rule to re-tune and where it lives.")
        lines += ["", "| case | dtype | auto ran · rule | auto ms | fastest of ours | best PyTorch | re-tune |",
                  "| --- | --- | --- | --- | --- | --- | --- |"] + table
    if missing:
        lines += ["", f"Not in this run: {', '.join(missing)}."]
    return lines
