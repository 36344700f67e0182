"""What every learned tree policy observes: candidates' cumulative draft log-probs, clipped at SCORE_FLOOR."""

SCORE_FLOOR = -30.0  # cumulative log-probs are clipped here (a padding value no real candidate reaches)
