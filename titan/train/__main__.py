"""`python -m titan.train [group=preset ...] [key=value ...]` (Hydra CLI; `-m` for sweeps)."""

from titan.train.cli import main

if __name__ == "__main__":
    main()
