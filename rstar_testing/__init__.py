"""Test support: deterministic fakes of the engine protocols and tiny-model builders.

Imported by `tests/` and `bench/` only; production code never imports it
(tests/test_import_rules.py), and service images do not ship it.
"""
