"""Per-device load and memory of a plan, broken down by table and tier, drawn with
matplotlib (optional extra).

Two panels share the device axis. Top: predicted ms/step per device, stacked by table
(the ``top`` tables by total load, the rest as "other"), with the solver's lower bound.
Bottom: HBM per device stacked the same way, hatched where a shard is a row cache over
host DRAM or the store, with the usable capacity; the unit (B, KB, MB, GB; 1 KB =
1000 B, as the topology's ``_gb`` fields) suits the largest value. A plan stores each
table's cost summed over its shards, so a table's share of a device is estimated from
its shards' sizes (rows times columns; replicas share equally) and scaled so every bar
is exactly the device's planned total. Legends sit beside the panels, never over bars.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from planner import Plan, PlannerError, Tier

BYTE_UNITS = (("B", 1.0), ("KB", 1e3), ("MB", 1e6), ("GB", 1e9), ("TB", 1e12))
"""Units the HBM axis may use, smallest first (decimal, as ``hbm_gb``)."""
CAPACITY_IN_VIEW = 4.0
"""The capacity line is drawn when it is at most this many times the fullest device;
above, the legend states it and the axis fits the bars."""
MAX_LABELLED_DEVICES = 32
"""Up to this many devices every one gets a tick label; beyond, about this many do."""
OTHER = "other"
TIER_HATCH = {Tier.HBM: "", Tier.DRAM_CACHE: "//", Tier.STORE_CACHE: "xx", Tier.HOST: ".."}
TIER_LABEL = {Tier.HBM: "in HBM", Tier.DRAM_CACHE: "row cache over DRAM",
              Tier.STORE_CACHE: "row cache over the store", Tier.HOST: "rows in host DRAM"}


def byte_unit(max_bytes: float) -> tuple[str, float]:
    """The largest unit of :data:`BYTE_UNITS` in which ``max_bytes`` is at least 1
    (bytes for 0 or less): ``(name, bytes per unit)``."""
    chosen = BYTE_UNITS[0]
    for unit in BYTE_UNITS:
        if max_bytes >= unit[1]:
            chosen = unit
    return chosen


def device_ticks(devices: int, max_labels: int = MAX_LABELLED_DEVICES) -> list[int]:
    """Integer device ids to label on an axis of ``devices`` devices: all of them up to
    ``max_labels``, else every k-th from 0 (k the smallest step that keeps at most
    ``max_labels``) and the last (in place of the one before when they are close)."""
    if devices <= max_labels:
        return list(range(devices))
    step = -(-devices // max_labels)
    ticks = list(range(0, devices, step))
    if ticks[-1] != devices - 1:
        if devices - 1 - ticks[-1] <= step / 2:  # too close to label both
            ticks[-1] = devices - 1
        else:
            ticks.append(devices - 1)
    return ticks


@dataclass(frozen=True, slots=True)
class Breakdown:
    """Per-device load and HBM split by table group and tier."""

    groups: tuple[str, ...]
    """Table names (most loaded first), then :data:`OTHER` when tables were folded in."""
    load_ms: dict[tuple[str, int], float]
    """(group, device) -> ms/step."""
    hbm_bytes: dict[tuple[str, Tier, int], float]
    """(group, tier, device) -> bytes."""
    folded: int = 0
    """Tables in :data:`OTHER`."""

    def label(self, group: str) -> str:
        return f"{OTHER} ({self.folded} tables)" if group == OTHER else group


MAX_NAMED = 20
"""Most tables a legend names (a tie at the top may name more than ``top``)."""


def _tied(a, b) -> bool:
    return (abs(a.cost.total_ms - b.cost.total_ms) <= 1e-9 * max(abs(a.cost.total_ms), 1e-300)
            and a.cost.hbm_bytes == b.cost.hbm_bytes)


def named_count(ranked: list, top: int) -> int:
    """How many of the ``ranked`` tables (most load first) the legend names: ``top``, but
    never a cut through tables of equal load and memory (which of them to name would be
    arbitrary): the cut moves before the tie, or, when the tie starts the ranking,
    after it (up to :data:`MAX_NAMED`; a larger leading tie names none). All of them
    when at most one would be folded."""
    if len(ranked) <= top + 1:
        return len(ranked)
    cut = top
    while 0 < cut < len(ranked) and _tied(ranked[cut - 1], ranked[cut]):
        cut -= 1
    if cut == 0:
        cut = 1
        while cut < len(ranked) and _tied(ranked[cut - 1], ranked[cut]):
            cut += 1
        if cut > MAX_NAMED:
            return 0
    return len(ranked) if len(ranked) - cut <= 1 else cut


def breakdown(plan: Plan, top: int = 10) -> Breakdown:
    """Split each device's planned load and HBM among the ``top`` tables with the most
    load (see :func:`named_count` for ties) and :data:`OTHER` (see the module doc for
    how shares are estimated)."""
    ranked = sorted(plan.tables, key=lambda t: (-t.cost.total_ms, -t.cost.hbm_bytes, t.name))
    named = {t.name for t in ranked[:named_count(ranked, top)]}
    groups = tuple(t.name for t in ranked if t.name in named)
    if len(named) < len(ranked):
        groups += (OTHER,)
    load: dict[tuple[str, int], float] = {}
    hbm: dict[tuple[str, Tier, int], float] = {}
    for table in plan.tables:
        group = table.name if table.name in named else OTHER
        sizes = [(s.row_end - s.row_start) * (s.col_end - s.col_start) for s in table.shards]
        total = sum(sizes)
        for shard, size in zip(table.shards, sizes):
            share = size / total if total else 1.0 / len(table.shards)
            key = (group, shard.device)
            load[key] = load.get(key, 0.0) + share * table.cost.total_ms
            mem = (group, shard.tier, shard.device)
            hbm[mem] = hbm.get(mem, 0.0) + share * table.cost.hbm_bytes
    for device in plan.devices:  # scale the estimates to the planned totals
        d = device.device
        _scale({k: v for k, v in load.items() if k[1] == d}, device.load_ms, load)
        _scale({k: v for k, v in hbm.items() if k[2] == d}, device.hbm_bytes, hbm)
    return Breakdown(groups, load, hbm, len(ranked) - len(named))


def _scale(part: dict, total: float, into: dict) -> None:
    estimated = sum(part.values())
    if estimated > 0:
        for key, value in part.items():
            into[key] = value * total / estimated


def draw_chart(plan: Plan, path: str | Path, top: int = 10) -> None:
    """Write the chart (see the module doc) as a PNG to ``path``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
    except ImportError:
        raise PlannerError("--chart needs matplotlib: pip install 'dlrm-toolkit[chart]'") from None
    parts = breakdown(plan, top)
    devices = [d.device for d in plan.devices]
    colours = plt.get_cmap("tab20").colors
    colour = {g: ("0.75" if g == OTHER else colours[i % len(colours)])
              for i, g in enumerate(parts.groups)}
    fig, (load_ax, mem_ax) = plt.subplots(
        2, 1, sharex=True, figsize=(min(26.0, 0.3 * len(devices) + 8.0), 7.0))

    bottom = [0.0] * len(devices)
    for group in parts.groups:
        heights = [parts.load_ms.get((group, d), 0.0) for d in devices]
        load_ax.bar(devices, heights, bottom=bottom, color=colour[group],
                    label=parts.label(group),
                    edgecolor="white", linewidth=0.3)
        bottom = [b + h for b, h in zip(bottom, heights)]
    bound = plan.solve.lower_bound_ms
    if bound is not None:
        load_ax.axhline(bound, color="tab:red", linestyle="--", label=f"lower bound {bound:.4g} ms")
    load_ax.set_ylim(0.0, 1.08 * max([bound or 0.0, *bottom]) or 1.0)
    load_ax.set_ylabel("predicted ms / step")
    gap = "no bound" if plan.solve.gap is None else f"gap {plan.solve.gap:.2%}"
    load_ax.set_title(f"{plan.solve.method}: slowest device {plan.solve.objective_ms:.4g} ms, "
                      f"{gap}")
    shown = len(parts.groups) - (OTHER in parts.groups)
    title = f"tables (top {shown} by load)" if OTHER in parts.groups else "tables"
    load_ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small",
                   title=title, title_fontsize="small", frameon=False)

    capacity = plan.topology.usable_hbm_bytes
    used = max(d.hbm_bytes for d in plan.devices)
    capacity_shown = capacity <= CAPACITY_IN_VIEW * used
    unit, scale = byte_unit(max(used, capacity) if capacity_shown else used)
    tiers = [t for t in Tier if any(v > 0 for k, v in parts.hbm_bytes.items() if k[1] is t)]
    bottom = [0.0] * len(devices)
    for group in parts.groups:
        for tier in tiers:
            heights = [parts.hbm_bytes.get((group, tier, d), 0.0) / scale for d in devices]
            if any(heights):
                mem_ax.bar(devices, heights, bottom=bottom, color=colour[group],
                           hatch=TIER_HATCH.get(tier, ".."), edgecolor="white", linewidth=0.3)
                bottom = [b + h for b, h in zip(bottom, heights)]
    cap_unit, cap_scale = byte_unit(capacity)
    cap_text = f"usable HBM {capacity / cap_scale:.4g} {cap_unit}"
    if capacity_shown:
        mem_ax.axhline(capacity / scale, color="black", linestyle="--")
    else:
        cap_text += f"\n({capacity / max(used, 1):,.0f}x the fullest device; off the axis)"
    mem_ax.set_ylim(0.0, 1.08 * max(used, capacity if capacity_shown else 0) / scale or 1.0)
    handles: list = [Line2D([], [], color="black", linestyle="--" if capacity_shown else "",
                            label=cap_text)]
    if set(tiers) - {Tier.HBM}:
        handles += [Patch(facecolor="0.85", edgecolor="black", hatch=TIER_HATCH.get(t, ".."),
                          label=TIER_LABEL.get(t, t.value)) for t in tiers]
    mem_ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  fontsize="small", frameon=False)
    mem_ax.set_ylabel(f"HBM {unit}")
    mem_ax.set_xlabel("device")
    ticks = device_ticks(len(devices))
    mem_ax.set_xticks([devices[i] for i in ticks])
    mem_ax.set_xlim(min(devices) - 0.6, max(devices) + 0.6)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
