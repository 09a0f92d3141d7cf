"""Trained routing: deciders with parameters (Learning-to-Cache, Elastic-DiT-style), module surgery (expert-choice
MoE in `moe/`) and their training."""

from .elastic import ElasticPlan, ElasticRouter
from .l2c import L2CRouter, RouterPlan
from .registry import load_router, router_plan

__all__ = ["ElasticPlan", "ElasticRouter", "L2CRouter", "RouterPlan", "load_router", "router_plan"]
