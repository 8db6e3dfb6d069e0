"""What every command needs around the model: snapshot folders, checkpoints and the run folder, processes, the
learning-rate schedule and data order, one-line errors."""
