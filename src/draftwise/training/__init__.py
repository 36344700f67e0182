"""Training: self-distilled data for draft heads, and the draft-head training loop."""
