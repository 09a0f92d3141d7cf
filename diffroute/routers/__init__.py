"""Trained deciders: routers with parameters (Learning-to-Cache, Elastic-DiT-style) and how a saved one loads.
Importing this package (a plan plugin) lets a router folder be given wherever a plan is accepted."""

from diffroute.plans.base import FOLDER_PLAN
from diffroute.routers.elastic import ElasticPlan, ElasticRouter
from diffroute.routers.l2c import L2CRouter, RouterPlan
from diffroute.routers.registry import load_router, router_plan

FOLDER_PLAN[:] = [router_plan]

__all__ = ["ElasticPlan", "ElasticRouter", "L2CRouter", "RouterPlan", "load_router", "router_plan"]
