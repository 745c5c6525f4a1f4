"""``python -m oba_fx`` = the ``oba-fx`` command."""
import sys

from .cli import main

sys.exit(main())
