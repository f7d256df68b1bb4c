"""Bundled hardware profiles (YAML, package data); measured ones under measured/."""
