"""Jinja prompt templates, shipped as package data so an installed wheel finds them."""
from pathlib import Path

TEMPLATE_DIR = Path(__file__).resolve().parent
