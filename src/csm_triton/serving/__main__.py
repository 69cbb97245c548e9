import sys

from csm_triton.serving.cli import main

sys.exit(main())
