"""Tests against a real Label Studio (see conftest.py)."""
