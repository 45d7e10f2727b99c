"""edje's test suite: one folder per subpackage of src/edje/ (tests/store/ tests edje.store, ...),
cross-cutting tests at the top, shared helpers in tests/helpers/, fixtures in conftest.py."""
