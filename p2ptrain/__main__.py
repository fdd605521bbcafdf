"""``python -m p2ptrain`` runs the CLI."""

import sys

from p2ptrain.cli import main

sys.exit(main())
