"""Conversions to and from other ecosystems' formats."""
