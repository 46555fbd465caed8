"""Interop tests: coreloop against real third-party servers run as subprocesses."""
