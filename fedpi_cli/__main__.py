import sys

from fedpi_cli import main

sys.exit(main())
