"""Tests of edje.backbones: the offline vision and text encoders."""
