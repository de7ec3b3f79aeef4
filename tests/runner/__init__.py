"""Tests of ollamad.runner."""
