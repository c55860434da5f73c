"""`python -m train.bench [--quick | --micro] [--out DIR]`: runs `train.bench.main`."""
from train.bench.main import main

if __name__ == "__main__":
    main()
