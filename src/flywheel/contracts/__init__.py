"""Formats that cross nodes: image preprocessing (training and the handler) and capture records
(the handler writes them, the monitor and `data snapshot` read them).

Standard library and numpy only (torch and google.cloud lazily, where a function needs them), and
nothing from the rest of flywheel: these modules are copied into every .mar beside the handler and
must import with `flywheel` off sys.path (tests/test_layout.py checks both).
"""
