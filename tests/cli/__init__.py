"""Tests of the `edje` command line (edje.cli, edje.commands) as a user runs it."""
