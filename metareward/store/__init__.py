"""Run files on disk: atomic writes, JSONL records and verified chunks (``records``), the run lock
(``runlock``), and the named kill points that tests and chaos runs stop a process at (``faults``).

Everything here is plain I/O: it imports nothing else from the package.
"""
