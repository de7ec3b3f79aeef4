"""Tests of ollamad.api."""
