"""`regate-train` and what a run needs around the model: flags, parallel bring-up, the
training loop, evaluation, metrics, checkpoints, the resume rule and stopping cleanly."""
