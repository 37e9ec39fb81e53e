"""``python -m apsfast`` is the ``apsfast`` command."""
import sys

from apsfast.cli import main

sys.exit(main())
