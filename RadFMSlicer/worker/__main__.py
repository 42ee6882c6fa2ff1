"""``python -m RadFMSlicer.worker``: serve requests on stdin/stdout."""

import sys

from .server import main

sys.exit(main())
