"""The paper wing: the paper's experiments, the commands that reproduce them, and their tables."""
