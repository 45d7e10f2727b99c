"""Tests of edje.evaluation: recall@k and two-stage evaluation."""
