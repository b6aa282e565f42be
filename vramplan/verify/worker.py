"""python -m vramplan.verify.worker REQUEST.json OUT_DIR: run one case, write OUT_DIR/rank<r>.json."""

import sys

from vramplan.verify.launch import worker_main

if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
