"""Tests of edje.data: the built-in sets, emoji, icons, folders, Hub and Karpathy data."""
