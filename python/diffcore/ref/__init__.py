"""Pure-torch references of every op, computed in float64: the ground truth of tests and benches.

Nothing here imports the rest of diffcore.
"""
