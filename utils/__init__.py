"""Training, evaluation and checkpoint utilities shared by every backbone.

The modules here are the ground floor (errors, io, images, checkpoint, metrics, ...); the wings
``data``, ``eval``, ``train`` and ``paper`` stand on it (docs/design.md draws the floors).
"""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project's root folder
