"""What every training recipe shares: optimiser groups, schedules, accumulation-correct loss
normalisation, precision, checkpoints and resume, metrics and progress."""
