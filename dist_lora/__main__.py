import sys

from dist_lora.cli import main

sys.exit(main())
