"""Losses for nnU-Net trainers."""
