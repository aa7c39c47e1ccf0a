"""Runtime configuration: AE titles, sources and destinations managed over HTTP.

Objects created or changed through the config API are kept in the store and
merged over the YAML file's settings at every start-up, so a change survives a
restart. A deleted object is kept as a tombstone, so deleting one that the
file defines also survives a restart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from dicom_node.config import (
    DestinationSettings,
    Settings,
    SourceSettings,
    tls_problems,
    unknown_key_hint,
)
from dicom_node.errors import Conflict, InvalidInput, NotFound
from dicom_node.logs import get_logger

if TYPE_CHECKING:
    from dicom_node.store import Store

# kind -> (settings section, the field that names an object)
KINDS: dict[str, tuple[str, str]] = {
    "ae": ("ae_titles", "ae_title"),
    "source": ("sources", "name"),
    "destination": ("destinations", "name"),
}

Objects = dict[str, dict[str, dict[str, Any] | None]]

log = get_logger("config")


class ConfigInvalid(InvalidInput):
    """A runtime change would make the settings invalid; ``problems`` name the fields."""

    def __init__(self, problems: list[dict[str, str]]) -> None:
        super().__init__("; ".join(f"{p['field']}: {p['message']}" for p in problems))
        self.problems = problems


def _apply(data: dict[str, Any], kind: str, name: str, body: dict[str, Any] | None) -> None:
    section, key = KINDS[kind]
    items = [item for item in data[section] if item[key] != name]
    if body is not None:
        items.append(body)
    data[section] = items


@dataclass(frozen=True)
class SkippedObject:
    """A stored object that does not validate against the settings it would join (an
    older version accepted it, or what it refers to is gone): not in force, but kept,
    shown by the config API as invalid, and fixed with PUT or removed with DELETE."""

    kind: str
    name: str
    body: dict[str, Any]
    problems: list[dict[str, str]]


def merge(base: Settings, objects: Objects, *, strict: bool = False,
          skipped: list[SkippedObject] | None = None, quiet: bool = False) -> Settings:
    """The effective settings: ``base`` with the runtime objects applied.

    An object that refers to another (an AE title naming a source) applies once that
    one has, whatever their order. With ``strict`` an object that does not fit raises
    :class:`ConfigInvalid`; otherwise it is left out (a start-up must not fail because
    a runtime object refers to something the file no longer defines) and, when
    ``skipped`` is given, added to it. Each left out is logged: an object as an error
    saying how to fix it, a delete as a warning (unless ``quiet``).
    """
    data = base.model_dump(mode="json")
    current = base
    pending: list[tuple[str, str, dict[str, Any] | None]] = []
    for kind in KINDS:
        for name, body in sorted(objects.get(kind, {}).items()):
            if body is None and (why := _undeletable(base, kind, name)):
                # stored before such deletes were refused: the file's entry applies
                log.warning("runtime config object skipped", kind=kind, name=name,
                            problems=[{"field": KINDS[kind][1], "message": why}])
                continue
            pending.append((kind, name, body))
    failed: dict[tuple[str, str], list[dict[str, str]]] = {}
    progress = True
    while pending and progress:  # until a pass applies nothing more
        progress, left = False, []
        for kind, name, body in pending:
            trial = dict(data)
            _apply(trial, kind, name, body)
            try:
                current_try = Settings.model_validate(trial)
                problems = [] if body is None else _use_problems(current_try, kind, name)
            except ValidationError as exc:
                problems = _problems(exc, kind)
            if problems:
                failed[kind, name] = problems
                left.append((kind, name, body))
                continue
            data, current, progress = trial, current_try, True
        pending = left
    for kind, name, body in pending:
        problems = failed[kind, name]
        if strict:
            raise ConfigInvalid(problems)
        if body is None:
            if not quiet:
                log.warning("runtime config object skipped", kind=kind, name=name,
                            problems=problems)
            continue
        if not quiet:
                log.error("runtime config object skipped: it does not validate, so it is not "
                      f"in force; fix it with PUT /config/{kind}/{name} or remove it with "
                      f"DELETE (GET /config/{kind} shows it with its problems)", kind=kind,
                      name=name, problems=problems)
        if skipped is not None:
            skipped.append(SkippedObject(kind, name, body, problems))
    return current


def _raw_problems(exc: ValidationError) -> list[tuple[str, str, Any]]:
    """Each problem as (key path inside the settings, message, pydantic error type)."""
    out: list[tuple[str, str, Any]] = []
    for err in exc.errors():
        ctx_err: Any = err.get("ctx", {}).get("error")
        key = getattr(ctx_err, "key", None)
        if key is not None:  # a cross-reference problem, and any more found with it
            out.append((key, ctx_err.problem, err["type"]))
            out.extend((k, p, err["type"]) for k, p in getattr(ctx_err, "more", ()))
            continue
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field" + unknown_key_hint(Settings, err["loc"])
        elif err["type"] == "missing":
            msg = "required field is missing"
        out.append((".".join(str(p) for p in err["loc"]), msg, err["type"]))
    return out


def _problems(exc: ValidationError, kind: str) -> list[dict[str, str]]:
    """The problems as the API shows them: a field inside the object changed is named
    by its path inside the object (``url``); any other by its full key
    (``watch.0.destinations``)."""
    section = KINDS[kind][0]
    out = []
    for key, msg, _ in _raw_problems(exc):
        parts = key.split(".")
        if parts[0] == section and len(parts) > 2:
            key = ".".join(parts[2:])
        out.append({"field": key or "(body)", "message": msg})
    return out


# section -> what a person calls one of its entries, and the field that names it
_USERS = {
    "ae_titles": ("AE title", "ae_title"),
    "sources": ("source", "name"),
    "destinations": ("destination", "name"),
    "watch": ("drop folder", "name"),
    "pipelines": ("pipeline", "name"),
}


def _in_use(exc: ValidationError, data: dict[str, Any], kind: str, name: str) -> str | None:
    """Why deleting ``name`` broke the settings, when it did so by being used elsewhere:
    "destination 'share' is used by drop folder 'drop' (watch.0.destinations)"."""
    section = KINDS[kind][0]
    users = []
    for key, _, _ in _raw_problems(exc):
        parts = key.split(".")
        if parts[0] == section:
            continue
        user = key
        if parts[0] in _USERS and len(parts) > 1 and parts[1].isdigit():
            label, field = _USERS[parts[0]]
            entry = data[parts[0]][int(parts[1])]
            user = f"{label} {entry[field]!r} ({key})"
        users.append(user)
    if not users:
        return None
    return f"{kind} {name!r} is used by {', '.join(users)}; remove it there first"


def _undeletable(settings: Settings, kind: str, name: str) -> str | None:
    """Why ``name`` must not be deleted, if it must not."""
    own = settings.dimse.ae_title
    if kind == "ae" and name == own:
        # The SCP accepts its own AE title without an entry (C-MOVE retrievals arrive
        # there), so a delete would only drop this entry's policy and let anyone store.
        return (f"{own!r} is this node's own AE title (dimse.ae_title), which C-MOVE "
                "retrievals send to and which is answered even without an entry: deleting "
                "it would only drop its policy; to limit who may store to it, PUT it with "
                "reject_unknown_sources: true and the sources allowed")
    return None


def file_overrides(base: Settings, effective: Settings,
                   objects: Objects) -> list[tuple[str, str, str]]:
    """(kind, name, "replaced" or "deleted") for each entry of the file that a stored
    object replaces or deletes in ``effective``."""
    found = []
    for kind in KINDS:
        in_file, now = objects_of(base, kind), objects_of(effective, kind)
        for name in sorted(objects.get(kind, {})):
            if name not in in_file:
                continue
            if name not in now:
                found.append((kind, name, "deleted"))
            elif now[name] != in_file[name]:
                found.append((kind, name, "replaced"))
    return found


def with_stored(settings: Settings, store: Store) -> tuple[Settings, int, list[SkippedObject]]:
    """``settings`` with the objects the config API stored merged on top (as the node
    runs), how many objects there are, and those left out because they do not validate.
    Each entry of the file that one replaces or deletes is logged."""
    objects = store.config_objects()
    count = sum(len(v) for v in objects.values())
    if not objects:
        return settings, 0, []
    skipped: list[SkippedObject] = []
    merged = merge(settings, objects, skipped=skipped)
    for kind, name, action in file_overrides(settings, merged, objects):
        log.info("file entry overridden by the config API", kind=kind, name=name,
                 action=action, section=KINDS[kind][0])
    return merged, count, skipped


def reapply(settings: Settings, skipped: list[SkippedObject]
            ) -> tuple[Settings, list[SkippedObject]]:
    """After a change, the objects left out that now validate (their source was fixed)
    applied; returns the settings and those still left out."""
    if not skipped:
        return settings, []
    objects: Objects = {}
    for obj in skipped:
        objects.setdefault(obj.kind, {})[obj.name] = obj.body
    still: list[SkippedObject] = []
    return merge(settings, objects, skipped=still, quiet=True), still


def objects_of(settings: Settings, kind: str) -> dict[str, dict[str, Any]]:
    section, key = KINDS[kind]
    return {item[key]: item for item in settings.model_dump(mode="json")[section]}


def change(settings: Settings, kind: str, name: str, body: dict[str, Any] | None, *,
           create: bool = False) -> Settings:
    """Validate one change against ``settings``; returns the new effective settings.

    Raises NotFound (update/delete of an unknown object), Conflict (create of an
    existing name, delete of one still in use or of the node's own AE title) or
    ConfigInvalid.
    """
    if kind not in KINDS:
        raise NotFound(f"unknown configuration kind {kind!r}")
    existing = objects_of(settings, kind)
    if create and name in existing:
        raise Conflict(f"{kind} {name!r} already exists; use PUT to change it")
    if not create and name not in existing:
        raise NotFound(f"no {kind} named {name!r}")
    if body is None and (why := _undeletable(settings, kind, name)):
        raise Conflict(why)
    if body is not None:
        key = KINDS[kind][1]
        given = body.get(key, name)
        if isinstance(given, str):  # " CXR " is CXR, as a called AE title's padding is
            given = given.strip()
        if given != name:
            raise ConfigInvalid([{"field": key, "message": "cannot be changed; create a new "
                                  "object and delete this one"}])
        body = {**body, key: name}
    base_data = settings.model_dump(mode="json")
    _apply(base_data, kind, name, body)
    try:
        new = Settings.model_validate(base_data)
    except ValidationError as exc:
        if body is None and (why := _in_use(exc, base_data, kind, name)):
            raise Conflict(why) from None
        raise ConfigInvalid(_problems(exc, kind)) from None
    if body is not None and (problems := _use_problems(new, kind, name)):
        raise ConfigInvalid(problems)
    return new


def _use_problems(settings: Settings, kind: str, name: str) -> list[dict[str, str]]:
    """What would stop the object from working although the settings are valid: the
    checks start-up makes of the file (files a TLS block names exist) and those a
    DICOMweb URL gets when used (no credentials in it, http or https, a host)."""
    from dicom_node.dicomweb import validate_base_url

    obj: SourceSettings | DestinationSettings | None = None
    urls: list[tuple[str, str | None]] = []
    if kind == "source":
        obj = next(s for s in settings.sources if s.name == name)
        urls = [("dicomweb_url", obj.dicomweb_url)]
    elif kind == "destination":
        obj = next(d for d in settings.destinations if d.name == name)
        urls = [("url", obj.url)] if obj.type == "dicomweb" else []
    if obj is None:
        return []
    found = [{"field": f"tls.{field}", "message": problem}
             for field, problem in tls_problems(settings, obj.tls)]
    for field, url in urls:
        if url is None:
            continue
        try:
            validate_base_url(url)
        except InvalidInput as exc:
            found.append({"field": field, "message": str(exc)})
    return found
