"""Runtime configuration: AE titles, sources and destinations managed over HTTP.

Objects created or changed through the config API are kept in the store and
merged over the YAML file's settings at every start-up, so a change survives a
restart. A deleted object is kept as a tombstone, so deleting one that the
file defines also survives a restart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from dicom_node.config import Settings, unknown_key_hint
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


def merge(base: Settings, objects: Objects, *, strict: bool = False) -> Settings:
    """The effective settings: ``base`` with the runtime objects applied.

    With ``strict`` an object that does not fit raises :class:`ConfigInvalid`;
    otherwise it is skipped with a warning (a start-up must not fail because a
    runtime object refers to something the file no longer defines).
    """
    data = base.model_dump(mode="json")
    current = base
    for kind in KINDS:
        for name, body in sorted(objects.get(kind, {}).items()):
            trial = dict(data)
            _apply(trial, kind, name, body)
            try:
                current = Settings.model_validate(trial)
            except ValidationError as exc:
                problems = _problems(exc, kind)
                if strict:
                    raise ConfigInvalid(problems) from None
                log.warning("runtime config object skipped", kind=kind, name=name,
                            problems=problems)
                continue
            data = trial
    return current


def _problems(exc: ValidationError, kind: str) -> list[dict[str, str]]:
    out = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        if loc and loc[0] == KINDS[kind][0]:
            loc = loc[2:]  # path inside the object, not inside the settings
        ctx_err = err.get("ctx", {}).get("error")
        key = getattr(ctx_err, "key", None)
        field = ".".join(loc) or (key.split(".", 2)[-1] if key else "(body)")
        msg = getattr(ctx_err, "problem", None) or err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field" + unknown_key_hint(Settings, err["loc"])
        elif err["type"] == "missing":
            msg = "required field is missing"
        out.append({"field": field, "message": msg})
    return out


def with_stored(settings: Settings, store: Store) -> tuple[Settings, int]:
    """``settings`` with the objects the config API stored merged on top (as the node
    runs), and how many objects there are."""
    objects = store.config_objects()
    count = sum(len(v) for v in objects.values())
    return (merge(settings, objects) if objects else settings), count


def objects_of(settings: Settings, kind: str) -> dict[str, dict[str, Any]]:
    section, key = KINDS[kind]
    return {item[key]: item for item in settings.model_dump(mode="json")[section]}


def change(settings: Settings, kind: str, name: str, body: dict[str, Any] | None, *,
           create: bool = False) -> Settings:
    """Validate one change against ``settings``; returns the new effective settings.

    Raises NotFound (update/delete of an unknown object), Conflict (create of an
    existing name) or ConfigInvalid.
    """
    if kind not in KINDS:
        raise NotFound(f"unknown configuration kind {kind!r}")
    existing = objects_of(settings, kind)
    if create and name in existing:
        raise Conflict(f"{kind} {name!r} already exists; use PUT to change it")
    if not create and name not in existing:
        raise NotFound(f"no {kind} named {name!r}")
    if body is not None:
        key = KINDS[kind][1]
        if body.get(key, name) != name:
            raise ConfigInvalid([{"field": key, "message": "cannot be changed; create a new "
                                  "object and delete this one"}])
        body = {**body, key: name}
    base_data = settings.model_dump(mode="json")
    _apply(base_data, kind, name, body)
    try:
        return Settings.model_validate(base_data)
    except ValidationError as exc:
        raise ConfigInvalid(_problems(exc, kind)) from None
