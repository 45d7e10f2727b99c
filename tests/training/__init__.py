"""Tests of edje.training: losses, sampling, the module, data modules, recipes and real fits."""
