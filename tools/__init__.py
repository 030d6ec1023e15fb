"""Developer tools outside the serving path (training the demo model, data preparation)."""
