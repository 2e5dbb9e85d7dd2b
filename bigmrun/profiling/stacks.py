"""Collapsed stacks: parse, merge across machines, summarise (pure functions, no I/O).

A profile here is a :class:`collections.Counter` mapping a stack (a tuple of frame
names, root first) to a sample count: the "collapsed" format of FlameGraph.pl and of
``py-spy record --format raw``, one ``frame;frame;frame COUNT`` line per stack.
py-spy names a Python frame ``function (file.py:line)``; native frames (``--native``)
look like ``symbol (libfoo.so)`` or ``0x7f... (libc.so.6)``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

#: A profile: stack (root first) -> samples.
Stacks = Counter[tuple[str, ...]]

_FRAME = re.compile(r"^(?P<name>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def parse_collapsed(text: str) -> Stacks:
    """Parse collapsed-stack text (``a;b;c 12`` per line); identical stacks add up.

    Blank lines are skipped. A line with no frames (`` 3``: py-spy writes those for
    samples of a thread without Python frames) is the empty stack ``()``: its samples
    count in the total but under no frame. A line whose last word is not a whole
    number is an error (``ValueError`` naming the line), not silently dropped.
    """
    out: Stacks = Counter()
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        stack, sep, count = line.rpartition(" ")
        if not sep or not count.isdigit():
            raise ValueError(f"line {lineno} of a collapsed profile is not "
                             f"'frame;frame COUNT': {line[:200]!r}")
        n = int(count)
        if n:
            out[tuple(stack.split(";")) if stack else ()] += n
    return out


def to_collapsed(stacks: Mapping[tuple[str, ...], int]) -> str:
    """Collapsed text, one line per stack, sorted (so equal profiles give equal text)."""
    return "".join(f"{';'.join(stack)} {n}\n" for stack, n in sorted(stacks.items()) if n > 0)


def merge(profiles: Mapping[str, Mapping[tuple[str, ...], int]],
          by_machine: bool = False) -> Stacks:
    """One profile from several (machine name -> stacks), summing identical stacks.

    With ``by_machine`` every stack gets its machine's name as a new root frame, so the
    flamegraph keeps the machines apart (one tower per machine) while staying one graph.
    """
    out: Stacks = Counter()
    for name, stacks in profiles.items():
        for stack, n in stacks.items():
            if n > 0:
                out[(name, *stack) if by_machine else tuple(stack)] += n
    return out


def total(stacks: Mapping[tuple[str, ...], int]) -> int:
    """All samples in a profile."""
    return sum(n for n in stacks.values() if n > 0)


@dataclass(frozen=True)
class FrameStat:
    """One frame's share of a profile."""

    name: str
    #: Samples where this frame was the innermost (running) one.
    self_samples: int
    #: Samples where this frame was anywhere on the stack (counted once per sample).
    total_samples: int


def frame_stats(stacks: Mapping[tuple[str, ...], int],
                skip_roots: Iterable[str] = ()) -> list[FrameStat]:
    """Self and total samples per frame name, most self samples first.

    ``skip_roots`` names root frames that are labels, not code (machine names of a
    ``by_machine`` profile): they are not counted as frames.
    """
    skip = set(skip_roots)
    selfs: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    for stack, n in stacks.items():
        if n <= 0:
            continue
        frames = stack[1:] if stack and stack[0] in skip else stack
        if not frames:
            continue
        selfs[frames[-1]] += n
        for name in set(frames):
            totals[name] += n
    stats = [FrameStat(name, selfs[name], totals[name]) for name in totals]
    stats.sort(key=lambda s: (-s.self_samples, -s.total_samples, s.name))
    return stats


def split_frame(frame: str) -> tuple[str, str | None, int | None]:
    """``"fn (file.py:12)"`` -> ``("fn", "file.py", 12)``; other names -> ``(name, None, None)``."""
    m = _FRAME.match(frame)
    if m is None:
        return frame, None, None
    line = m.group("line")
    return m.group("name"), m.group("file"), int(line) if line else None


__all__ = ["FrameStat", "Stacks", "frame_stats", "merge", "parse_collapsed", "split_frame",
           "to_collapsed", "total"]
