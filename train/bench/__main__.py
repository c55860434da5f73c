"""`python -m train.bench [--quick | --micro] [--out DIR]`: runs `train.bench.main`."""
from train.interrupts import exit_while_loading  # standard library only

if __name__ == "__main__":  # a Ctrl-C while the imports below load JAX ends at once, in one line, exit 130
    exit_while_loading()

from train.bench.main import main  # noqa: E402

if __name__ == "__main__":
    main()
