"""Train DRSformer on mixed rain datasets, with or without CoIC (see docs/training.md)."""
from utils.train.run import main

if __name__ == "__main__":
    raise SystemExit(main("DRSformer"))
