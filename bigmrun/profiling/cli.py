"""``bigmrun profile``: one flamegraph of a whole running cluster.

``bigmrun profile --merged [-d SECONDS] [--format svg|speedscope|collapsed] [-o FILE]
[--machine NAME] [--native] [--idle] [--driver] [--by-machine] [--session ID]`` finds
the running session through its session file, asks its debug server for the raw
per-machine stacks (``/debug/profile?format=raw``: py-spy runs on every RUNNING machine
at once), merges and renders them here, writes the file and prints a summary: samples
per machine and the top frames. Without ``--merged`` it writes one file per machine.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import click

from ..errors import ConfigError
from .capture import DEFAULT_RATE, MAX_SECONDS, SLACK
from .cluster import FORMATS, bundle_stacks, render_bundle
from .stacks import frame_stats, merge, total


def _default_output(session: str, fmt: str, when: float) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(when))
    return f"bigmrun-profile-{session[:8]}-{stamp}.{FORMATS[fmt][1]}"


def _per_machine_path(path: str, label: str) -> str:
    for ext in sorted((e for _, e in FORMATS.values()), key=len, reverse=True):
        if path.endswith("." + ext):
            return f"{path[: -len(ext) - 1]}-{label}.{ext}"
    stem, ext = os.path.splitext(path)
    return f"{stem}-{label}{ext}"


def _write(path: str, data: bytes) -> None:
    if path == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _size(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} B"


def summary(bundle: dict[str, Any], top: int = 10) -> list[str]:
    """Lines for the terminal: samples per participant, then the top frames."""
    stacks = bundle_stacks(bundle)
    merged = merge(stacks)
    grand = total(merged)
    opts = bundle.get("options", {})
    n = len(bundle["profiles"])
    lines = [f"Profiled {n} participant{'s' if n != 1 else ''} of session "
             f"{bundle['session']} for {bundle['seconds']}s at "
             f"{opts.get('rate', DEFAULT_RATE)} Hz: {grand:,} samples "
             f"(took {bundle.get('elapsed', 0):.1f}s)"]
    width = max((len(k) for k in [*bundle["profiles"], *bundle["errors"]]), default=4)
    for label, p in bundle["profiles"].items():
        where = f"pid {p.get('pid')} on {p.get('host')}" if p.get("pid") else ""
        lines.append(f"  {label:<{width}}  {p['samples']:>8,} samples  {where}".rstrip())
    for label, err in bundle["errors"].items():
        first = err.strip().splitlines()[0] if err.strip() else "failed"
        lines.append(f"  {label:<{width}}  FAILED: {first[:160]}")
    for name, state in bundle.get("skipped", {}).items():
        lines.append(f"  {name:<{width}}  skipped ({state})")
    stats = frame_stats(merged)[:top]
    if stats and grand:
        lines.append(f"Top frames by own samples (of {grand:,}):")
        for s in stats:
            lines.append(f"  {100 * s.self_samples / grand:5.1f}% self "
                         f"{100 * s.total_samples / grand:5.1f}% total  {s.name}")
    return lines


@click.command("profile", context_settings={"help_option_names": ["-h", "--help"],
                                            "max_content_width": 100})
@click.option("--merged", is_flag=True,
              help="Write ONE profile of the whole cluster, identical stacks summed across "
                   "machines. Without it: one file per machine.")
@click.option("-d", "--duration", "seconds", type=click.IntRange(1, MAX_SECONDS), default=5,
              show_default=True, help="Seconds to sample for (all machines at once).")
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)), default="svg",
              show_default=True,
              help="svg: interactive flamegraph (click to zoom, search); speedscope: JSON "
                   "for speedscope.app; collapsed: FlameGraph.pl's folded text.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, allow_dash=True),
              help="File to write ('-' for standard output) "
                   "[default: bigmrun-profile-SESSION-TIME.EXT].")
@click.option("--machine", metavar="NAME", help="Profile only this machine.")
@click.option("--native", is_flag=True, help="Include native (C/C++/Cython) frames.")
@click.option("--idle", is_flag=True, help="Include idle (waiting) threads.")
@click.option("--driver", is_flag=True, help="Profile the driver process too.")
@click.option("--by-machine", is_flag=True,
              help="Keep machines apart: each machine's name becomes a root frame.")
@click.option("--rate", type=click.IntRange(1, 10000), default=DEFAULT_RATE, show_default=True,
              help="Samples per second.")
@click.option("--nonblocking", is_flag=True,
              help="Do not pause the processes while sampling (less overhead, less exact).")
@click.option("--lines", is_flag=True,
              help="One frame per source line being run (py-spy's default) instead of one "
                   "per function.")
@click.option("--top", type=click.IntRange(0, 1000), default=10, show_default=True,
              help="Frames to list in the summary.")
@click.option("--session", metavar="ID", help="The session to profile (when several run).")
def profile(merged: bool, seconds: int, fmt: str, output: str | None, machine: str | None,
            native: bool, idle: bool, driver: bool, by_machine: bool, rate: int,
            nonblocking: bool, lines: bool, top: int, session: str | None) -> None:
    """Profile a running session's machines with py-spy and write a flamegraph.

    \b
    Examples:
      bigmrun profile --merged -d 5                  # bigmrun-profile-....svg
      bigmrun profile --merged --by-machine --driver -o cluster.svg
      bigmrun profile --merged --format speedscope -o p.json --machine m1
      bigmrun profile -d 10                          # one SVG per machine

    The machines' processes must allow ptrace by their own child (py-spy): see the
    error message for what to grant when they do not.
    """
    from ..debug import client

    try:
        info = client.pick_one(session)
        bundle = client.get(info, "/debug/profile", timeout=seconds + SLACK + 60,
                            seconds=seconds, format="raw", machine=machine,
                            native=1 if native else None, idle=1 if idle else None,
                            driver=1 if driver else None, rate=rate,
                            nonblocking=1 if nonblocking else None,
                            lines=1 if lines else None)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:  # requests' connection errors derive from OSError
        raise click.ClickException(f"cannot reach the session's debug server: {e}") from None
    if not isinstance(bundle, dict) or "profiles" not in bundle:
        raise click.ClickException("the debug server's answer is not a profile bundle")
    to_stderr = output == "-"
    echo = (lambda s: click.echo(s, err=True)) if to_stderr else click.echo
    if not bundle["profiles"]:
        failures = "\n".join(f"  {k}: {v}" for k, v in bundle["errors"].items())
        raise click.ClickException(f"no machine could be profiled:\n{failures}")
    for line in summary(bundle, top):
        echo(line)
    written: list[tuple[str, int]] = []
    path = output or _default_output(bundle["session"], fmt, bundle.get("time", time.time()))
    if merged:
        data = render_bundle(bundle, fmt, by_machine=by_machine)
        _write(path, data)
        written.append((path, len(data)))
    else:
        if path == "-" and len(bundle["profiles"]) > 1:
            raise click.UsageError("-o - writes one profile: add --merged or --machine")
        for label, p in bundle["profiles"].items():
            one = dict(bundle, profiles={label: p}, errors={})
            data = render_bundle(one, fmt)
            target = path if len(bundle["profiles"]) == 1 else _per_machine_path(path, label)
            _write(target, data)
            written.append((target, len(data)))
    for target, size in written:
        if target != "-":
            echo(f"Wrote {os.path.abspath(target)} ({fmt}, {_size(size)})")
    for label, err in bundle["errors"].items():
        click.echo(f"warning: {label} was not profiled: {err}", err=True)


if __name__ == "__main__":  # python -m bigmrun.profiling.cli (also: bigmrun profile)
    profile()
