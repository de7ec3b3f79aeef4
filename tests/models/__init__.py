"""Tests of ollamad.models."""
