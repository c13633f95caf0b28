"""A module that must never be imported by a request: on import it leaves a marker file (FEDPI_TEST_MARKER) and
exits the process, as a hostile or broken package might."""

import os
import sys
from pathlib import Path

if marker := os.environ.get("FEDPI_TEST_MARKER"):
    Path(marker).write_text("imported\n")
sys.exit(3)
