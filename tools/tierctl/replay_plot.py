"""`tierctl replay --plot`: the replay's results as a PNG (matplotlib, imported only here).

Left: prefix hit rate against the chain's total capacity, one line per policy, with the
never-evicting ceiling. Right: each level's occupancy over the trace for the largest
capacity replayed, one colour per policy, one line style per level.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tierctl.replay import RunResult

_STYLES = ("-", "--", ":")


def plot_replay(results: list[RunResult], ideal: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot
    import matplotlib.pyplot as plt

    policies = list(dict.fromkeys(r.policy for r in results))
    colours = {p: f"C{i % 10}" for i, p in enumerate(policies)}
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    for policy in policies:
        runs = sorted((r for r in results if r.policy == policy),
                      key=lambda r: sum(r.capacity_bytes.values()))  # fmt: skip
        left.plot([sum(r.capacity_bytes.values()) / 2**30 for r in runs],
                  [100 * r.hit_rate for r in runs], marker="o", label=policy,
                  color=colours[policy])  # fmt: skip
    left.axhline(100 * ideal, color="grey", linestyle=":", label="never evicts")
    left.set_xscale("log", base=2)
    sizes = {sum(r.capacity_bytes.values()): r.capacity_bytes for r in results}
    left.set_xticks([t / 2**30 for t in sizes],
                    ["+".join(_gib(c) for c in caps.values()) for caps in sizes.values()],
                    fontsize="small")  # fmt: skip
    left.minorticks_off()
    left.set_xlabel("capacity per level (GiB, fastest first)")
    left.set_ylabel("prefix hit rate (% of input tokens)")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize="small")
    largest = max(sum(r.capacity_bytes.values()) for r in results)
    for r in results:
        if sum(r.capacity_bytes.values()) != largest:
            continue
        t_min = [t / 60 for t in r.occupancy["t_s"]]
        for style, level in zip(_STYLES, r.capacity_bytes):
            right.plot(t_min, [100 * x for x in r.occupancy[level]], linestyle=style,
                       color=colours[r.policy], label=f"{r.policy} {level}")  # fmt: skip
    caps = next(r.capacity_bytes for r in results if sum(r.capacity_bytes.values()) == largest)
    right.set_title(" + ".join(f"{n} {_gib(c)} GiB" for n, c in caps.items()),
                    fontsize="medium")  # fmt: skip
    right.set_xlabel("trace time (min)")
    right.set_ylabel("occupancy (% of the level)")
    right.set_ylim(0, 105)
    right.grid(True, alpha=0.3)
    right.legend(fontsize="x-small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _gib(n: int) -> str:
    return f"{n / 2**30:.6g}"
