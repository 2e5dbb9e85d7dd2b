"""A small task scheduler that survives machines dying: the pattern chaos tests need.

::

    results = run_tasks(b, "PI.sample", [(10_000,)] * 400, timeout=30)

Each task is one call. Up to ``per_machine`` tasks run at once on each RUNNING machine
of ``b`` (machines started while the tasks run, e.g. a chaos monkey's replacements, are
used as they come up). A task whose call fails because its machine went away
(:class:`MachineLostError`), or with a temporary error, is queued again and runs on
another live machine; any other error is final and raised. Results come back in task
order. A task may thus *start* more than once (its first machine died mid-call), but
its result is counted once: write tasks whose repetition is harmless (pure, or
idempotent), as bigpi's sampling is.
"""

from __future__ import annotations

import collections
import concurrent.futures
import time
from collections.abc import Sequence
from typing import Any

from .._machine import Machine, State
from .._session import B
from ..errors import BigmrunError, MachineLostError


def run_tasks(b: B, method: str, tasks: Sequence[tuple[Any, ...]], *,
              per_machine: int = 2, timeout: float = 600.0,
              call_timeout: float | None = None, max_attempts: int = 20) -> list[Any]:
    """Run ``method(*task)`` for every task on ``b``'s live machines; return the results.

    Raises the task's error when a task fails for a reason other than a lost machine or
    a temporary error, or has been tried ``max_attempts`` times;
    :class:`TimeoutError` if everything is not done within ``timeout`` seconds.
    """
    results: list[Any] = [None] * len(tasks)
    attempts = [0] * len(tasks)
    todo = collections.deque(range(len(tasks)))
    running: dict[concurrent.futures.Future[Any], tuple[int, Machine]] = {}
    load: collections.Counter[str] = collections.Counter()
    deadline = time.monotonic() + timeout
    while todo or running:
        if time.monotonic() > deadline:
            for f in running:
                f.cancel()
            raise TimeoutError(f"{len(todo) + len(running)} of {len(tasks)} tasks "
                               f"not done within {timeout}s")
        live = [m for m in b.machines() if m.owned and m.state == State.RUNNING]
        for m in live:
            while todo and load[m.name] < per_machine:
                i = todo.popleft()
                attempts[i] += 1
                running[m.submit(method, *tasks[i], timeout=call_timeout)] = (i, m)
                load[m.name] += 1
        if not running:
            time.sleep(0.05)  # no live machine right now: wait for a replacement
            continue
        done, _ = concurrent.futures.wait(list(running), timeout=0.2,
                                          return_when=concurrent.futures.FIRST_COMPLETED)
        for f in done:
            i, m = running.pop(f)
            load[m.name] -= 1
            try:
                results[i] = f.result()
            except BigmrunError as e:
                if not (isinstance(e, MachineLostError) or e.temporary) or \
                        attempts[i] >= max_attempts:
                    for g in running:
                        g.cancel()
                    raise
                todo.append(i)
    return results
