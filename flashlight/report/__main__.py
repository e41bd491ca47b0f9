"""``python -m flashlight.report``: see flashlight/report/build.py."""
import sys

from flashlight.report.build import main

sys.exit(main())
