"""Training, evaluation and checkpoint utilities shared by every backbone."""
