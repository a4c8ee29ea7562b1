"""``python -m probing_core`` — the command-line interface (see probing_core/cli)."""
import sys

from probing_core.cli import main

sys.exit(main())
