"""`python -m tierctl ...`"""

from __future__ import annotations

import sys

from tierctl.cli import main

if __name__ == "__main__":
    sys.exit(main())
