"""Compare two per-step loss logs (``examples/train.py --log-file``), e.g. one GPU vs FSDP on two.

    python examples/compare_losses.py single.json fsdp.json --tolerance 1e-3

Each log is a JSON list of ``{"phase", "step", "loss", ...}`` records (or ``{"losses": [...]}``, or
JSON lines). Records are matched by (phase, step); the relative difference of a step is
``|b - a| / max(|a|, 1e-12)``. Prints a table and the maximum, and exits with status

* 0 when every step is within ``--tolerance``,
* 1 when some step exceeds it,
* 2 when the logs do not cover the same steps (or are empty / unreadable).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def load_log(path) -> dict:
    """``{(phase, step): record}`` from a loss log."""
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    if isinstance(data, dict):
        data = data.get("losses", data.get("log_history", []))
    out = {}
    for rec in data:
        if isinstance(rec, dict) and "loss" in rec and "step" in rec:
            out[(str(rec.get("phase", "")), int(rec["step"]))] = rec
    return out


def compare(a: dict, b: dict, key: str = "loss") -> list[dict]:
    """Per-step rows ``{phase, step, a, b, abs_diff, rel_diff}`` for the steps both logs share."""
    rows = []
    for k in sorted(set(a) & set(b)):
        x, y = float(a[k][key]), float(b[k][key])
        diff = abs(y - x)
        rel = diff / max(abs(x), 1e-12) if math.isfinite(diff) else math.inf
        rows.append({"phase": k[0], "step": k[1], "a": x, "b": y, "abs_diff": diff, "rel_diff": rel})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="reference log (e.g. one GPU)")
    ap.add_argument("b", help="log to check (e.g. FSDP)")
    ap.add_argument("--tolerance", type=float, default=1e-3, help="maximum relative difference per step")
    ap.add_argument("--key", default="loss", help="field to compare (default loss; e.g. grad_norm)")
    ap.add_argument("--json", default=None, help="also write the comparison here")
    args = ap.parse_args(argv)
    try:
        a, b = load_log(args.a), load_log(args.b)
    except (OSError, ValueError) as err:
        print(f"cannot read the logs: {err}")
        return 2
    if not a or not b:
        print(f"empty log: {args.a} has {len(a)} steps, {args.b} has {len(b)}")
        return 2
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if any(args.key not in r or r[args.key] is None for r in list(a.values()) + list(b.values())):
        print(f"some records have no {args.key!r}")
        return 2
    rows = compare(a, b, args.key)
    if not rows:
        print(f"MISMATCH: no step in common (a: {sorted(a)[:5]}, b: {sorted(b)[:5]})")
        return 2
    print(f"{'phase':<6} {'step':>5} {'a':>12} {'b':>12} {'rel diff':>10}")
    for r in rows:
        print(f"{r['phase']:<6} {r['step']:>5} {r['a']:>12.6f} {r['b']:>12.6f} {r['rel_diff']:>10.2e}")
    worst = max(rows, key=lambda r: r["rel_diff"])
    ok = worst["rel_diff"] <= args.tolerance and not only_a and not only_b
    summary = {"a": args.a, "b": args.b, "key": args.key, "steps": len(rows), "max_rel_diff": worst["rel_diff"],
               "worst_step": worst["step"], "tolerance": args.tolerance, "only_in_a": only_a, "only_in_b": only_b,
               "pass": ok, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    if only_a or only_b:
        print(f"MISMATCH: steps only in a: {only_a[:10]}, only in b: {only_b[:10]}")
        return 2
    print(f"max relative difference of {args.key}: {worst['rel_diff']:.3e} at step {worst['step']} "
          f"over {len(rows)} steps (tolerance {args.tolerance:g}): {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
