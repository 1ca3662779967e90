"""``python -m manifests``."""

import sys

from manifests.cli import main

sys.exit(main())
