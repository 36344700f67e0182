"""Tree policies: how many draft calls to make and how many candidates to verify, each round.

Runtime policies, one file each (baselines.py, radar.py, ltd.py, per_mode.py), by name in load.py; the round cost
model they are trained for in cost.py; learning them offline in learn/.
"""
