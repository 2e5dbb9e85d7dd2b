"""Getting the program onto a machine: how to re-run it, and (remote) how to ship it."""
