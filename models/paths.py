"""Where things live on disk: a plan store's layout and the stores this repository ships.

A plan store::

    <store>/backbone/                  the backbone checkpoint its plans were made for
    <store>/<task>/<name>/             plan directories (plan.json + weights.safetensors)
    <store>/store.json                 which plans are loaded / active (service.store)
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_PLANS = REPO_ROOT / "plans"  # the embedded default: the tiny ViLT's store
SHIPPED_BACKBONE = SHIPPED_PLANS / "backbone"
SHIPPED_METER_PLANS = SHIPPED_PLANS / "meter"  # the tiny METER: its own store
STORE_STATE_FILE = "store.json"
STORE_BACKBONE_DIR = "backbone"


def store_backbone_of_plan(plan_dir: str | os.PathLike) -> Path | None:
    """The backbone of the plan store a plan directory ``<store>/<task>/<name>`` lies in:
    ``<store>/backbone`` when ``<store>/store.json`` exists, else None."""
    store = Path(plan_dir).resolve().parent.parent
    return store / STORE_BACKBONE_DIR if (store / STORE_STATE_FILE).is_file() else None
