"""`make stress`: the stress suite (python -m stress.run); see stress/run.py."""
