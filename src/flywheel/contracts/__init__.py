"""Formats that cross nodes: image preprocessing (training and the handler), capture records (the
handler writes them, the monitor and `data snapshot` read them), the archive manifest (`package`
writes it; release, the handler and the CLI read it; `ArchiveStamp`, the served archive as registry
tags), the reference sample (training writes it, the monitor reads it) and the tested drift windows
with their prediction ids (the monitor writes them, `flywheel trace` reads them).

Standard library and numpy only (torch and google.cloud lazily, where a function needs them), and
nothing from the rest of flywheel: those in serving.MAR_CONTRACTS are copied into every .mar beside
the handler and must import with `flywheel` off sys.path (tests/test_layout.py checks both).
"""
