"""Calls into third-party internals, one small module per library, each pinned by a test that fails loudly
when the pinned version changes them (tests/unit/test_compat_*.py)."""
