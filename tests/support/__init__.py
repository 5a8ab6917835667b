"""Helpers shared by the tests (instead of tests importing each other's modules)."""
