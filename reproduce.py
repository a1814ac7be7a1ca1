"""Run one of the paper's experiments by name, as ordinary train/test commands (see docs/reproducing.md).

    python reproduce.py main --dry_run        # every command, in order, and where each result lands
    python reproduce.py spa --gpus 4          # train, evaluate, tabulate; rerunning resumes
    python reproduce.py --demo                # the same machinery in miniature, on the CPU
"""
from utils.paper.runner import main

if __name__ == "__main__":
    raise SystemExit(main())
