"""Tests of edje.serving: `edje serve` over HTTP, its limits, exact mode and the search page."""
