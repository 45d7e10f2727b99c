"""Tests of edje.scoring: the fast and ONNX scorers and exact mode."""
