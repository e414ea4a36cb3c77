"""Compare benchmark records and plot their history.

    soundstorm bench --preset small --seconds 10 --history bench-history.jsonl   # each version
    python bench/compare.py bench-history.jsonl                 # newest vs the previous record
    python bench/compare.py bench-history.jsonl --against 0     # ... vs the first record
    python bench/compare.py bench-history.jsonl --against 1fe64ae --plot history.png

Records are compared only with records of the same settings (preset, seconds, batch,
backend, dtype, device). --against takes a record index (negative counts from the end) or
a commit prefix.

A change is flagged better or worse only when it is larger than the run-to-run noise:
each figure's spread within a record (the min and max over its timed rounds), widened by
the other records of the same commit and settings (repeated runs), on whichever side of
the comparison it is larger; and never below --threshold (2 % by default).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from soundstorm.engine.benchmark import SETTINGS, read_history

THRESHOLD = 0.02   # changes under 2 % are never flagged
FIGURES = (  # name, label, True when larger is better
    ("real_time_factor", "real-time factor", False),
    ("wall_s", "wall time (s)", False),
    ("frames_per_s", "frames/s", True),
    ("achieved_gflops", "achieved GFLOP/s", True),
    ("matmul_gflops", "torch.matmul GFLOP/s", True),
    ("fraction_of_matmul", "fraction of matmul", True),
)


def settings_key(record: dict) -> tuple:
    return tuple(record["settings"].get(k) for k in SETTINGS)


def describe(record: dict) -> str:
    s = record["settings"]
    return (f"{s.get('preset')} {s.get('seconds')}s batch {s.get('batch')} {s.get('backend')} "
            f"{s.get('dtype')} {s.get('device')}")


def pick(records: list[dict], against: Optional[str], newest: int) -> int:
    """Index of the record to compare the newest one with."""
    same = [i for i in range(len(records)) if i != newest
            and settings_key(records[i]) == settings_key(records[newest])]
    if against is None:
        earlier = [i for i in same if i < newest]
        if not earlier:
            raise SystemExit(f"no earlier record with the settings of the newest one "
                             f"({describe(records[newest])})")
        return earlier[-1]
    try:
        index = int(against)
    except ValueError:
        matches = [i for i in same if (records[i].get("commit") or "").startswith(against)]
        if not matches:
            raise SystemExit(f"--against {against!r}: no record of commit {against!r} with "
                             f"the settings {describe(records[newest])}")
        return matches[-1]
    if not -len(records) <= index < len(records):
        raise SystemExit(f"--against {index}: the history has {len(records)} records")
    index %= len(records)
    if settings_key(records[index]) != settings_key(records[newest]):
        raise SystemExit(f"--against {index}: record {index} has other settings "
                         f"({describe(records[index])}) than the newest ({describe(records[newest])})")
    return index


def figure_range(figures: dict, key: str) -> tuple[float, float]:
    """(low, high) of a figure over a record's timed rounds: the wall time's min and max
    carry over to the figures computed from it; records without them give (value, value)."""
    value = figures[key]
    wall, lo, hi = (figures.get(k) for k in ("wall_s", "wall_s_min", "wall_s_max"))
    if wall and lo and hi:
        if key in ("wall_s", "real_time_factor"):        # proportional to the wall time
            return value * lo / wall, value * hi / wall
        if key in ("frames_per_s", "achieved_gflops"):   # inversely proportional
            return value * wall / hi, value * wall / lo
    bounds = {"fraction_of_matmul": ("fraction_min", "fraction_max"),
              "matmul_gflops": ("matmul_gflops_min", "matmul_gflops_max")}.get(key)
    if bounds and all(figures.get(b) is not None for b in bounds):
        return figures[bounds[0]], figures[bounds[1]]
    return value, value


def relative_spread(records: list[dict], key: str, value: float) -> float:
    """The spread of a figure over `records` (one record, or repeated runs of the same
    commit and settings), relative to `value`."""
    ranges = [figure_range(r["figures"], key) for r in records if key in r["figures"]]
    low, high = min(lo for lo, _ in ranges), max(hi for _, hi in ranges)
    return (high - low) / abs(value) if value else 0.0


def repeats_of(records: list[dict], index: int) -> list[dict]:
    """The record at `index` and every other record of the same settings and commit."""
    record = records[index]
    commit = record.get("commit")
    if commit is None:
        return [record]
    return [r for r in records if r is record or (r.get("commit") == commit
                                                  and settings_key(r) == settings_key(record))]


def comparison_table(old: dict, new: dict, old_runs: Optional[list[dict]] = None,
                     new_runs: Optional[list[dict]] = None, threshold: float = THRESHOLD) -> str:
    """Each figure before and after, its change and the noise it is held against; a change
    is better or worse only beyond max(the larger side's spread, threshold)."""
    old_runs, new_runs = old_runs or [old], new_runs or [new]
    lines = [f"{describe(new)}",
             f"  {'':<22}{'before':>12}{'after':>12}{'change':>10}{'noise':>9}",
             f"  {'commit':<22}{(old.get('commit') or '?')[:10]:>12}{(new.get('commit') or '?')[:10]:>12}"]
    for key, label, larger_better in FIGURES:
        a, b = old["figures"].get(key), new["figures"].get(key)
        if a is None or b is None:
            continue
        change = (b - a) / a if a else float("nan")
        noise = max(relative_spread(old_runs, key, a), relative_spread(new_runs, key, b),
                    threshold)
        better = (change > 0) == larger_better
        verdict = " better" if better else " worse"
        if not abs(change) > noise:
            verdict = " within noise" if abs(change) >= threshold else ""
        lines.append(f"  {label:<22}{a:>12.4g}{b:>12.4g}{change * 100:>+9.1f}%"
                     f"{'±' + format(noise * 100, '.1f') + '%':>9}{verdict}")
    if old.get("machine") != new.get("machine"):
        lines.append("  note: the records come from different machines; compare ratios, "
                     "not times")
    return "\n".join(lines)


def plot_history(records: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, list[tuple[int, dict]]] = {}
    for i, r in enumerate(records):
        groups.setdefault(settings_key(r), []).append((i, r))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, items in groups.items():
        label = describe(items[0][1])
        xs = [i for i, _ in items]
        axes[0].plot(xs, [r["figures"]["real_time_factor"] for _, r in items], "o-", label=label)
        axes[1].plot(xs, [r["figures"].get("fraction_of_matmul", float("nan")) for _, r in items],
                     "o-", label=label)
    axes[0].set(title="Real-time factor (lower is faster)", xlabel="record", ylabel="RTF")
    axes[1].set(title="Fraction of torch.matmul FLOP/s", xlabel="record", ylabel="fraction",
                ylim=(0, None))
    ticks = list(range(len(records)))
    for ax in axes:
        ax.set_xticks(ticks, [(r.get("commit") or "?")[:7] for r in records], rotation=45,
                      fontsize=7)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Compare benchmark records; plot the history.")
    p.add_argument("history", type=Path, help="JSON-lines file written by soundstorm bench --history")
    p.add_argument("--against", help="record index or commit prefix (default: the previous "
                                     "record with the same settings)")
    p.add_argument("--plot", type=Path, metavar="PNG", help="write the history plot here")
    p.add_argument("--threshold", type=float, default=THRESHOLD * 100, metavar="PERCENT",
                   help="never flag changes smaller than this (default 2); larger ones are "
                        "flagged only beyond the records' spread")
    a = p.parse_args(argv)
    if not (a.threshold >= 0 and a.threshold < float("inf")):
        p.error(f"--threshold must be a finite percentage >= 0, got {a.threshold}")
    try:
        records = read_history(a.history)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"compare.py: error: {e}")
    if not records:
        raise SystemExit(f"compare.py: error: {a.history} has no records")
    if a.plot:
        plot_history(records, a.plot)
        print(f"wrote {a.plot}")
    newest = len(records) - 1
    if len(records) == 1 and a.against is None:
        print("one record only: nothing to compare yet")
        return 0
    before = pick(records, a.against, newest)
    print(comparison_table(records[before], records[newest], repeats_of(records, before),
                           repeats_of(records, newest), a.threshold / 100))
    return 0


if __name__ == "__main__":
    sys.exit(main())
