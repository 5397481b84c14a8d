"""Put first on PYTHONPATH by `acb-run --auto`: installs automatic mode in the program."""

import sys

try:
    from acb_slurm.launcher.auto import bootstrap
except ImportError as exc:  # the program's interpreter cannot see acb-slurm
    sys.stderr.write(
        f"acb-run --auto: cannot import acb_slurm in {sys.executable} ({exc}); install acb-slurm "
        "into the environment that runs the program\n"
    )
    raise SystemExit(2) from None
bootstrap()
