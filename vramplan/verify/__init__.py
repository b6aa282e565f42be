"""vramplan verify: run the reference step on the local GPU and compare with the estimate.

GPU-side libraries (peft, bitsandbytes, hqq, galore-torch) are imported only when a
method needs them; this package imports without them. The command line is vramplan.cli.verify.
"""

from vramplan.verify.api import VerifyReport, verify

__all__ = ["verify", "VerifyReport"]
