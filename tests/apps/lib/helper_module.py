"""Importable only through the configured python path."""

VALUE = "from the python path"
