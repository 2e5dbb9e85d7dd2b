"""Cluster profiling: py-spy on every machine at once, merged into ONE flamegraph.

``capture``  machine side: py-spy on the machine's own process (``Supervisor.profile``),
             ptrace permission (Yama ``PR_SET_PTRACER``) and finding the binary
``cluster``  driver side: profile the RUNNING machines (and the driver) concurrently,
             bundle the results, merge and render them
``stacks``   collapsed stacks: parse, merge (summing samples), top frames (pure)
``render``   interactive SVG flamegraph and speedscope JSON (pure)
``routes``   the debug server's ``/debug/profile``
``cli``      ``bigmrun profile --merged``
"""

from .capture import ProfileError, PtraceDeniedError, find_py_spy, profile_self
from .cluster import profile_cluster, render_bundle
from .render import flamegraph_svg, speedscope
from .stacks import merge, parse_collapsed, to_collapsed

__all__ = ["ProfileError", "PtraceDeniedError", "find_py_spy", "flamegraph_svg", "merge",
           "parse_collapsed", "profile_cluster", "profile_self", "render_bundle", "speedscope",
           "to_collapsed"]
