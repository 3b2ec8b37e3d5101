"""Imported by reload_apps.py: the reload-on-change tests rewrite VALUE."""

VALUE = 1
