"""Drawing a ``StatusView``: labelled rows, as plain text (a snapshot, a pipe) or as a rich
table (the live screen). Both come from ``rows()``, so they always say the same."""

from __future__ import annotations

from fedbus.status.model import StatusView

MAX_IDS_SHOWN = 24  # a long cohort is cut: "+N more"


def ids(values, limit: int = MAX_IDS_SHOWN) -> str:
    values = list(values)
    if not values:
        return "-"
    shown = " ".join(values[:limit])
    return shown + (f" +{len(values) - limit} more" if len(values) > limit else "")


def headline(v: StatusView) -> str:
    """``round R of T`` (sync) or ``model vM of T`` (async): the line a person (or a test) looks for."""
    if v.phase is None:
        return "nothing committed yet"
    total = f" of {v.total}" if v.total else ""
    if v.mode == "async":
        return f"model v{v.model_version}{total}"
    return f"round {v.round}{total}"


def rows(v: StatusView) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    state = v.done_reason and f"done ({v.done_reason})" or (v.phase or "waiting for the coordinator's first commit")
    out.append(("job", f"{v.job}" + (f"  run {v.run}" if v.run else "")))
    out.append(("mode", v.mode if v.mode != "?" else "-"))
    progress = headline(v)
    if v.mode == "sync":
        progress += f"  model v{v.model_version}" if v.model_version is not None else ""
    if v.completed is not None:
        progress += f"  ({v.completed} {v.unit}s committed)"
    out.append(("progress", progress))
    out.append(("state", state + (f", {v.round_age_s:.0f} s open" if v.round_age_s is not None else "")
                + (f" (deadline {v.deadline_s:g} s)" if v.round_age_s is not None and v.deadline_s else "")))
    cohort_label = "assigned" if v.mode == "async" else "cohort"
    out.append((cohort_label, f"({len(v.cohort)}) {ids(v.cohort)}"))
    out.append(("training", f"({len(v.training)}) {ids(v.training)}"))
    if v.mode == "async":
        why = "far behind the current version"
    else:
        why = f"round {v.round} waits on them" if v.stragglers else ""
    out.append(("stragglers", ids(v.stragglers) + (f"  ({why})" if v.stragglers else "")))
    if v.missed_round is not None:
        out.append((f"left out of round {v.missed_round}", ids(v.missed)))
    out.append(("workers", f"{v.alive} alive" + (f", silent: {ids(v.silent)}" if v.silent else "")))
    last_stale = " ".join(map(str, v.staleness_last[:MAX_IDS_SHOWN])) or "-"
    out.append(("staleness", f"last {v.unit}: {last_stale}"
                + (f"; max {v.staleness_max} over {v.closes_kept} {v.unit}s" if v.staleness_max is not None else "")))
    rej = ", ".join(f"{reason} {n}" for reason, n in v.rejected.items()) or "none"
    out.append(("rejections", f"{rej}  (last {v.closes_kept} {v.unit}s)" if v.closes_kept else rej))
    out.append(("privacy ε", "-" if v.epsilon is None else f"{v.epsilon:.4g}"))
    acc = "  ".join(f"v{ver} {a:.3f}" for ver, a in v.accuracy) or "-"
    out.append(("test accuracy", acc))
    if v.last_close is not None:
        c = v.last_close
        out.append((f"last {v.unit}", f"{c.round} {c.status} in {c.seconds * 1000:.0f} ms, "
                                      f"{len(c.accepted) + len(c.late)} updates folded"))
    if v.record_age_s is not None:
        out.append(("last commit", f"{v.record_age_s:.1f} s ago"))
    if v.problems:
        out.append(("refused", ", ".join(v.problems)))
    return out


def render_plain(v: StatusView) -> str:
    width = max(len(label) for label, _ in rows(v))
    return "\n".join(f"{label:>{width}}  {value}" for label, value in rows(v))


def render_rich(v: StatusView):
    """A rich renderable: the rows in a table, a bar for the committed rounds/versions."""
    from rich.panel import Panel
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold cyan", justify="right", no_wrap=True)
    table.add_column(overflow="fold")
    if v.total and v.completed is not None:
        table.add_row("", ProgressBar(total=v.total, completed=min(v.completed, v.total), width=40))
    for label, value in rows(v):
        style = "yellow" if label in ("stragglers", "refused") and value != "-" else None
        table.add_row(label, value, style=style)
    return Panel(table, title=f"fedbus status · {v.job}", subtitle=headline(v))
