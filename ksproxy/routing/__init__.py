"""
Routing: resources in, an immutable route table out (pure; no reactor, no I/O).

L{compileTable} builds a L{RouteTable} once per change; L{RouteTable.lookup} picks the one route that serves a
request, deterministically (SPEC 2).
"""

from ksproxy.routing.compile import CompileResult, compileTable
from ksproxy.routing.table import Conflict, Route, RouteTable

__all__ = ["CompileResult", "Conflict", "Route", "RouteTable", "compileTable"]
