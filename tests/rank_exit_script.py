"""`cppo` under `accelerate launch`, recording each rank's exit code in $RANK_EXIT_DIR/rank_<RANK>: the
launcher does not report its workers' exit codes after it forwarded a signal."""

import os
import sys
from pathlib import Path

from cppo.cli import main

code = main(sys.argv[1:])
directory = Path(os.environ["RANK_EXIT_DIR"])
directory.mkdir(parents=True, exist_ok=True)
(directory / f"rank_{os.environ.get('RANK', '0')}").write_text(str(code))
sys.exit(code)
