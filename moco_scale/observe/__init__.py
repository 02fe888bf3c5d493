"""What a run shows of itself: metrics and health warnings, stage timing, plots."""
