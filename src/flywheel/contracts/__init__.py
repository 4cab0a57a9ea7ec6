"""Formats that cross nodes: image preprocessing (training and the handler), capture records (the
handler writes them, the monitor and `data snapshot` read them), the archive manifest (`package`
writes it; release, the handler and the CLI read it) and the reference sample (training writes it,
the monitor reads it).

Standard library and numpy only (torch and google.cloud lazily, where a function needs them), and
nothing from the rest of flywheel: those in serving.MAR_CONTRACTS are copied into every .mar beside
the handler and must import with `flywheel` off sys.path (tests/test_layout.py checks both).
"""
