"""Engines: one small file each behind `Engine.run(inputs) -> outputs`; `create_engine` picks one."""

from mae.runtime.engines.base import Engine, create_engine

__all__ = ["Engine", "create_engine"]
