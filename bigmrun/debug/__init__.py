"""Debugging a running cluster: the driver's debug server, session files, statistics.

Each driver serves a small HTTP API on 127.0.0.1 (random port, random token); a session
file readable only by the user records its address and token, which is how the
``bigmrun ps``/``logs``/``profile`` commands find running drivers.
"""
