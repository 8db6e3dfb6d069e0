"""What every command needs around the model: snapshot folders (snapshot.py reads them, shards.py writes safetensors
shards tensor by tensor), checkpoints and the run folder, processes, the learning-rate schedule and data order, flag
and path checks, one-line errors, and the grid's summary of finished run folders (grid_summary.py)."""
