"""Trained routing: deciders with parameters (Learning-to-Cache) and the recorded trajectories they train on."""

from .l2c import L2CRouter, RouterPlan, load_router

__all__ = ["L2CRouter", "RouterPlan", "load_router"]
