"""Deployment helpers for labbus (local development services)."""
