"""`python -m labpal_fast` is the `labpal-fast` command."""
import sys

from .cli import main

sys.exit(main())
