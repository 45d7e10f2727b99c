"""Tests of the bench/ scripts: what they compute, on tiny sizes (never timed)."""
