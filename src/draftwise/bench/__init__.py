"""`draftwise bench`: every method on the same prompts, model and settings, measured as Spec-Bench does.

datasets.py loads prompt sets, runner.py runs methods (draftwise's and peers like HF generate), metrics.py turns
per-prompt records into tokens/s, speedup, τ and the losslessness verdicts, report.py and plots.py write them out.
The command line is `draftwise.cli.bench`.
"""
