# -*- test-case-name: tests.unit.test_status -*-
"""
What ksproxy reports back on its custom resources (SPEC 8), as pure functions.

Our CRDs, like KubeSphere's, have no status subresource, so every status write also bumps
C{metadata.generation}.  The functions here therefore never decide on the generation alone: a write is needed
only when the content (condition status, reason, message, C{link}, C{state}) differs, or when the spec changed
since the status on the server was written (the caller tells L{statusPatch} so with C{refreshGeneration}; see
L{needsGenerationRefresh}).  That is what keeps ksproxy from answering its own writes and keeps a quiet
cluster free of writes.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from typing import Any, Dict, List, Mapping, Optional

import attrs

from ksproxy.model.types import STATE_AVAILABLE, STATE_DISABLED, STATE_UNAVAILABLE, Rejection

__all__ = [
    "CONDITION_TYPES",
    "Condition",
    "desiredStatus",
    "statusPatch",
    "specHash",
    "statusIsCurrent",
    "needsGenerationRefresh",
    "rfc3339",
]

ACCEPTED = "Accepted"
RESOLVED_REFS = "ResolvedRefs"
PROGRAMMED = "Programmed"
UPSTREAM_HEALTHY = "UpstreamHealthy"
CONDITION_TYPES = (ACCEPTED, RESOLVED_REFS, PROGRAMMED, UPSTREAM_HEALTHY)

# metav1.Condition limits message to 32768 characters; the CRD schema enforces it too.
_MAX_MESSAGE = 32768


@attrs.frozen
class Condition:
    """One entry of C{status.conditions}, without C{lastTransitionTime} (L{statusPatch} owns that)."""

    type: str
    status: str  # "True" | "False" | "Unknown"
    reason: str  # CamelCase, as metav1.Condition requires
    message: str
    observedGeneration: int

    def toDict(self) -> Dict[str, Any]:
        return {
            "type": self.type,
            "status": self.status,
            "reason": self.reason,
            "message": self.message[:_MAX_MESSAGE],
            "observedGeneration": self.observedGeneration,
        }


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _generation(raw: Mapping[str, Any]) -> int:
    generation = _mapping(raw.get("metadata")).get("generation")
    # bool is an int subclass; a hand-written manifest has no generation at all.
    if isinstance(generation, int) and not isinstance(generation, bool) and generation >= 0:
        return generation
    return 0


def _isDisabled(status: Mapping[str, Any]) -> bool:
    """An extension manager's switch: C{state: Disabled}, or the earliest design's C{enabled: false}."""
    return status.get("state") == STATE_DISABLED or status.get("enabled") is False


def desiredStatus(
    raw: Mapping[str, Any],
    *,
    accepted: Optional[Rejection],
    conflict: Optional[str],
    refsError: Optional[str],
    programmed: bool,
    upstreamHealthy: Optional[bool],
    defaultedLink: Optional[str],
    manageState: bool,
    stateGate: bool = False,
) -> Dict[str, Any]:
    """
    The parts of C{status} that ksproxy wants on C{raw}: the four conditions, plus C{link} and C{state} when
    ksproxy owns them.  Keys that ksproxy does not own are absent, so a merge patch leaves them alone.

    @param accepted: the rejection of the current version, or None when it was accepted.
    @param conflict: names the winner when one of the object's matchers lost a conflict (SPEC 2).
    @param refsError: why a referenced ConfigMap/Secret could not be read, or None.
    @param programmed: whether (some version of) the object is in the live route table.
    @param upstreamHealthy: the health checks' verdict, None when there is none yet (or no check).
    @param defaultedLink: the JSBundle link of SPEC 1.4 when the manifest has no C{status.link}.
    @param manageState: C{--manage-state}: write C{state} Available/Unavailable (never over Disabled).
    @param stateGate: C{--state-gate=kubesphere} is on; only used to explain why an object is not served.
    """
    generation = _generation(raw)
    status = _mapping(raw.get("status"))
    state = status.get("state")
    disabled = _isDisabled(status)

    def cond(type: str, value: str, reason: str, message: str) -> Dict[str, Any]:
        return Condition(type, value, reason, message, generation).toDict()

    if accepted is not None:
        acceptedCond = cond(ACCEPTED, "False", "Invalid", str(accepted))
    elif conflict is not None:
        acceptedCond = cond(ACCEPTED, "False", "Conflict", f"conflicts with {conflict}, which wins")
    else:
        acceptedCond = cond(ACCEPTED, "True", "Accepted", "the object is valid")

    if refsError is not None:
        refsCond = cond(RESOLVED_REFS, "False", "RefNotResolved", refsError)
    elif accepted is not None:
        refsCond = cond(RESOLVED_REFS, "Unknown", "NotAccepted", "references are not resolved for a rejected object")
    else:
        refsCond = cond(RESOLVED_REFS, "True", "ResolvedRefs", "all references resolved")

    if programmed:
        if accepted is not None:
            programmedCond = cond(
                PROGRAMMED, "True", "LastAcceptedVersion",
                "the last accepted version is served; the current one was rejected",
            )
        elif conflict is not None:
            programmedCond = cond(
                PROGRAMMED, "True", "PartiallyProgrammed", "served, except for the matchers lost to a conflict"
            )
        else:
            programmedCond = cond(PROGRAMMED, "True", "Programmed", "served from the live route table")
    elif accepted is not None:
        programmedCond = cond(PROGRAMMED, "False", "Invalid", "not served: the object was rejected")
    elif conflict is not None:
        programmedCond = cond(PROGRAMMED, "False", "Conflict", f"not served: conflicts with {conflict}")
    elif refsError is not None:
        programmedCond = cond(PROGRAMMED, "False", "RefNotResolved", "not served: a reference does not resolve")
    elif disabled:
        programmedCond = cond(PROGRAMMED, "False", "Disabled", "not served: status.state is Disabled")
    elif stateGate and state != STATE_AVAILABLE:
        programmedCond = cond(
            PROGRAMMED, "False", "StateGate",
            f"not served: --state-gate=kubesphere serves only status.state Available (is {state!r})",
        )
    else:
        programmedCond = cond(PROGRAMMED, "False", "Pending", "not yet in the live route table")

    if upstreamHealthy is None:
        healthCond = cond(UPSTREAM_HEALTHY, "Unknown", "NotChecked", "no health check result")
    elif upstreamHealthy:
        healthCond = cond(UPSTREAM_HEALTHY, "True", "Healthy", "the upstream passes its health checks")
    else:
        healthCond = cond(
            UPSTREAM_HEALTHY, "False", "Unhealthy", "the upstream fails its health checks; requests get 503"
        )

    desired: Dict[str, Any] = {"conditions": [acceptedCond, refsCond, programmedCond, healthCond]}
    link = status.get("link")
    if defaultedLink and not (isinstance(link, str) and link):
        desired["link"] = defaultedLink
    if manageState and not disabled:
        desired["state"] = STATE_AVAILABLE if programmed else STATE_UNAVAILABLE
    return desired


_COMPARED = ("status", "reason", "message")


def statusPatch(
    raw: Mapping[str, Any], desired: Mapping[str, Any], now: str, *, refreshGeneration: bool = False
) -> Optional[Dict[str, Any]]:
    """
    The JSON merge patch (C{{"status": {...}}}) that turns C{raw}'s status into C{desired}, or None when
    there is nothing to write.

    Conditions compare on status, reason and message; C{observedGeneration} counts only with
    C{refreshGeneration} (the spec changed since the server's status was written), because our own previous
    write bumped the generation.  A merge patch replaces lists whole, so the patch carries every condition:
    other writers' condition types are kept as they are, ours keep their C{lastTransitionTime} unless their
    status changed.

    @param now: RFC 3339 timestamp for conditions whose status changes (see L{rfc3339}).
    """
    current = _mapping(raw.get("status"))
    patch: Dict[str, Any] = {}
    for key in ("link", "state"):
        if key in desired and current.get(key) != desired[key]:
            patch[key] = desired[key]

    if "conditions" in desired:
        merged, changed = _mergeConditions(current.get("conditions"), desired["conditions"], now, refreshGeneration)
        if changed:
            patch["conditions"] = merged
    return {"status": patch} if patch else None


def _mergeConditions(
    existing: object, wanted: List[Mapping[str, Any]], now: str, refreshGeneration: bool
) -> tuple[List[Dict[str, Any]], bool]:
    wantedByType = {c["type"]: c for c in wanted}
    existingList = existing if isinstance(existing, list) else []
    changed = not isinstance(existing, list) and existing is not None
    merged: List[Dict[str, Any]] = []
    placed = set()

    def ours(old: Optional[Mapping[str, Any]], new: Mapping[str, Any]) -> Dict[str, Any]:
        nonlocal changed
        entry = dict(new)
        oldTime = old.get("lastTransitionTime") if old is not None else None
        if old is not None and old.get("status") == new["status"] and isinstance(oldTime, str) and oldTime:
            entry["lastTransitionTime"] = oldTime
        else:
            entry["lastTransitionTime"] = now
            changed = True
        if old is not None and any(old.get(k) != new[k] for k in _COMPARED):
            changed = True
        if refreshGeneration and (old is None or old.get("observedGeneration") != new["observedGeneration"]):
            changed = True
        return entry

    for entry in existingList:
        kind = entry.get("type") if isinstance(entry, Mapping) else None
        if kind in wantedByType:
            if kind in placed:
                changed = True  # a duplicate of one of ours: drop it
                continue
            placed.add(kind)
            merged.append(ours(entry, wantedByType[kind]))
        else:
            merged.append(entry)  # someone else's: kept verbatim
    for kind, new in wantedByType.items():
        if kind not in placed:
            merged.append(ours(None, new))
    return merged, changed


def specHash(raw: Mapping[str, Any]) -> str:
    """
    A digest of everything that bumps C{metadata.generation} except C{status}: the spec (and any other
    top-level field).  Used to tell a spec change from a status write, which both bump the generation.
    """
    content = {k: v for k, v in raw.items() if k not in ("metadata", "status", "apiVersion", "kind")}
    encoded = json.dumps(content, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(encoded.encode("utf-8")).hexdigest()


def statusIsCurrent(raw: Mapping[str, Any]) -> bool:
    """
    Whether the conditions on the server were written for the spec the object has now: the last
    generation bump was the status write itself, so C{observedGeneration >= generation - 1} for each of ours.
    """
    conditions = _mapping(raw.get("status")).get("conditions")
    if not isinstance(conditions, list):
        return False
    generation = _generation(raw)
    seen = False
    for entry in conditions:
        if isinstance(entry, Mapping) and entry.get("type") in CONDITION_TYPES:
            observed = entry.get("observedGeneration")
            if not isinstance(observed, int) or observed < generation - 1:
                return False
            seen = True
    return seen


def needsGenerationRefresh(raw: Mapping[str, Any], statusSpec: Optional[str]) -> bool:
    """
    Whether C{observedGeneration} alone justifies a write.

    @param statusSpec: the L{specHash} that the server's status is known to describe (recorded by the
        writer when it wrote, or when L{statusIsCurrent} said so), or None when unknown.
    @return: True when the spec differs from it; when unknown, True unless the status is current.
    """
    if statusSpec is None:
        return not statusIsCurrent(raw)
    return specHash(raw) != statusSpec


def rfc3339(seconds: float) -> str:
    """Seconds since the epoch (e.g. C{reactor.seconds()}) as the RFC 3339 UTC form Kubernetes writes."""
    moment = datetime.datetime.fromtimestamp(int(seconds), tz=datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
