"""Serving image entrypoint: TorchServe in the foreground, its key renewer beside it.

TorchServe's keys expire (`token_expiration_min`); `flywheel.serving.keys` (shipped in the image
under /opt/flywheel/flywheel/, standard library only) renews both through TorchServe's token API at
half their lifetime, reading the management address from config.properties (or TS_MANAGEMENT_ADDRESS)
and the key file from FLYWHEEL_TS_KEY_FILE. SIGTERM (docker stop) reaches the whole TorchServe
process group; the container exits with TorchServe's status.

    python /opt/flywheel/entrypoint.py -- torchserve --foreground --ncs --ts-config ... --model-store ...
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # /opt/flywheel: the flywheel/ copy

from flywheel.serving.keys import main  # noqa: E402 - after the path is set

sys.exit(main())
