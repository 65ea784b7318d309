import sys

from temper.cli import main

sys.exit(main())
