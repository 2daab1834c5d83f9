"""FHIR R4 resources -> clinical facts for the lumbar imaging criteria. Pure: no I/O, no HTTP.

Every resource is first read into `Item`s (one coded thing with its date, status and value), after the
status filters of criteria.yaml; entered-in-error and refuted data never become items. The criteria
(cauda equina features, red flags, conservative care, modifiers) are then evaluated over the items.
Every fact keeps the evidence (FHIR reference, display, date) behind it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any, Iterable

from . import fhir_values as fv
from .knowledge import Knowledge

ORDER_REASON = "OrderReason"
_UNREAD = object()  # a value not computed yet
MEDICATION_TYPES = ("MedicationRequest", "MedicationStatement")

# Every top-level element of a patient record resource that this module reads. The HTTP edge decodes
# prefetched resources with these elements only (cds_service/protocol.py), so an element read here
# must be listed here. (Draft orders are always decoded whole.)
RESOURCE_ELEMENTS = (
    "resourceType", "id", "status", "code", "birthDate",
    "clinicalStatus", "verificationStatus", "onsetDateTime", "onsetPeriod", "recordedDate", "abatementDateTime", "abatementPeriod",
    "effectiveDateTime", "effectivePeriod", "effectiveInstant", "issued", "dataAbsentReason", "component", "interpretation",
    "valueQuantity", "valueCodeableConcept", "valueBoolean", "valueString",
    "medicationCodeableConcept", "medicationReference", "contained", "dosageInstruction", "dosage", "dispenseRequest",
    "authoredOn", "dateAsserted", "performedDateTime", "performedPeriod", "performedString",
    "occurrenceDateTime", "occurrencePeriod",
)


@dataclass(frozen=True)
class Evidence:
    reference: str | None  # "Condition/123"; None when the resource has no id
    resource_type: str  # Condition, Observation, ..., or OrderReason (the draft order's reasonCode)
    display: str
    date: date | None = None
    value: str | None = None  # e.g. "38.6 Cel"


@dataclass
class Finding:
    id: str  # e.g. RF-CANCER, CES-URINARY-RETENTION, RF-FAILED-CONSERVATIVE-6W, MOD-PREGNANCY
    rule: str  # criteria.md rule: C1..C7, R1..R13, F1, M1..M3
    label: str
    kind: str  # ces | red-flag | conservative-care | modifier
    evidence: list[Evidence] = field(default_factory=list)
    protocol: str | None = None  # without | with-and-without
    fine_orders: tuple[str, ...] = ()
    guidelines: tuple[str, ...] = ()
    urgent: bool = False
    notes: tuple[str, ...] = ()  # e.g. drug-induced-retention


@dataclass(frozen=True)
class ImagingOrder:
    reference: str | None  # "ServiceRequest/abc", used in suggestions' resourceId
    resource: dict
    modality: str  # MR | CT | XR
    contrast: str | None  # without | with | with-and-without | intrathecal | unspecified | None (X-ray)
    coding: dict  # the coding that put the order in scope
    display: str
    reason_groups: frozenset[str] = frozenset()


@dataclass
class Episode:
    start: date | None
    evidence: list[Evidence]


@dataclass
class ClinicalFacts:
    today: date
    age: int | None
    patient_reference: str | None
    orders: list[ImagingOrder]
    out_of_scope_orders: list[str]
    episode: Episode | None
    ces: list[Finding]
    red_flags: list[Finding]
    conservative_care: Finding | None  # present when therapy started; `failed` says whether >= 6 weeks
    conservative_care_days: int | None
    conservative_care_failed: bool
    modifiers: list[Finding]
    unreadable: dict[str, str]  # resource type -> reason
    missing: list[str]  # resource types neither sent nor fetchable

    @property
    def episode_days(self) -> int | None:
        if self.episode is None or self.episode.start is None:
            return None
        return max(fv.days_between(self.episode.start, self.today), 0)

    def has_modifier(self, modifier_id: str) -> bool:
        return any(m.id == modifier_id for m in self.modifiers)


@dataclass
class Item:
    source: str  # resource type, or ORDER_REASON
    resource: dict
    concept: dict
    groups: frozenset[str]
    date: date | None
    current: bool  # Conditions: clinical status current; others: True after the status filters
    positive: bool = True  # Observations of findings: False when valued absent/negative
    explicit_positive: bool = False  # Observation explicitly valued present/positive
    quantity: dict | None = None  # Observation valueQuantity
    end: date | None = None  # medications: end of supply
    status: str | None = None


def extract_facts(
    resources: Iterable[dict],
    draft_orders: dict,
    selections: tuple[str, ...] | None,
    today: date,
    knowledge: Knowledge,
    unreadable: dict[str, str] | None = None,
    missing: Iterable[str] = (),
) -> ClinicalFacts:
    criteria = knowledge.criteria
    resources = [r for r in resources if isinstance(r, dict) and isinstance(r.get("resourceType"), str)]
    orders, out_of_scope = read_orders(draft_orders, selections, knowledge)
    reader = _ItemReader(knowledge, today, resources)
    items = reader.items
    for order in orders:
        items.extend(reader.order_reason_items(order.resource))
    by_group: dict[str, list[Item]] = {}
    for item in items:
        for group in item.groups:
            by_group.setdefault(group, []).append(item)

    patient = _find_patient(resources)
    age = fv.age_in_years(fv.parse_date(patient.get("birthDate")), today) if patient else None
    evaluator = _Evaluator(knowledge, today, by_group, age)

    ces = evaluator.findings(criteria["ces_features"], "ces")
    red_flags = evaluator.findings(criteria["red_flags"], "red-flag")
    modifiers = evaluator.findings(criteria["modifiers"], "modifier")
    episode = evaluator.episode(criteria["episode"])
    care, care_days = evaluator.conservative_care(criteria["conservative_care"], episode)
    failed = care is not None and care_days is not None and care_days >= criteria["conservative_care"]["min_days"]
    return ClinicalFacts(
        today=today,
        age=age,
        patient_reference=fv.reference_of(patient) if patient else None,
        orders=orders,
        out_of_scope_orders=out_of_scope,
        episode=episode,
        ces=ces,
        red_flags=red_flags,
        conservative_care=care,
        conservative_care_days=care_days,
        conservative_care_failed=failed,
        modifiers=modifiers,
        unreadable=dict(unreadable or {}),
        missing=list(missing),
    )


def read_orders(draft_orders: dict, selections: tuple[str, ...] | None, knowledge: Knowledge) -> tuple[list[ImagingOrder], list[str]]:
    """The lumbar imaging orders to evaluate: the selected ones (order-select), else every draft order."""
    order_groups: dict[str, str] = knowledge.criteria["orders"]["groups"]
    excluded = set(knowledge.criteria["status"]["order"]["excluded"])
    candidates: list[tuple[dict, set[str]]] = []
    entries = draft_orders.get("entry") if isinstance(draft_orders, dict) else None
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict) or not isinstance(entry.get("resource"), dict):
            continue
        resource = entry["resource"]
        if resource.get("resourceType") != "ServiceRequest" or fv.text(resource.get("status")) in excluded:
            continue
        names = {fv.reference_of(resource) or "", fv.text(resource.get("id")) or "", fv.text(entry.get("fullUrl")) or ""} - {""}
        candidates.append((resource, names))
    if selections:
        selected = [(r, n) for r, n in candidates if n & set(selections)]
        if selected:  # selections that match nothing: evaluate every draft (never miss a cauda equina order)
            candidates = selected
    orders: list[ImagingOrder] = []
    out_of_scope: list[str] = []
    for resource, names in candidates:
        concept = resource.get("code")
        concept_groups = knowledge.codes.concept_groups(concept)
        order = None
        for group, modality in order_groups.items():
            coding = knowledge.codes.first_coding_in(concept, group) if group in concept_groups else None
            if coding is not None:
                attributes = knowledge.codes.attributes(coding.get("system"), coding.get("code"))
                order = ImagingOrder(
                    reference=fv.reference_of(resource),
                    resource=resource,
                    modality=modality,
                    contrast=attributes.get("contrast") if modality != "XR" else None,
                    coding=coding,
                    display=fv.concept_display(concept, coding),
                    reason_groups=frozenset().union(*(knowledge.codes.concept_groups(c) for c in _list(resource.get("reasonCode")))),
                )
                break
        if order:
            orders.append(order)
        else:
            out_of_scope.append(fv.reference_of(resource) or "ServiceRequest")
    return orders, out_of_scope


class _ItemReader:
    """Reads resources into items, applying the status filters of criteria.yaml."""

    def __init__(self, knowledge: Knowledge, today: date, resources: list[dict]):
        self.codes = knowledge.codes
        self.status = knowledge.criteria["status"]
        self.values = knowledge.criteria["finding_values"]
        self.today = today
        self.medications = {fv.reference_of(r): r for r in resources if r.get("resourceType") == "Medication" and r.get("id")}
        self.items: list[Item] = []
        readers = {
            "Condition": self._condition,
            "Observation": self._observation,
            "MedicationRequest": self._medication,
            "MedicationStatement": self._medication,
            "Procedure": self._procedure,
            "ServiceRequest": self._service_request,
        }
        for resource in resources:
            reader = readers.get(resource["resourceType"])
            if reader:
                self.items.extend(reader(resource))

    def _item(self, source: str, resource: dict, concept: Any, when: date | None, current: bool = True, **extra: Any) -> Item | None:
        if not isinstance(concept, dict):
            return None
        groups = self.codes.concept_groups(concept)
        if not groups:
            return None
        return Item(source=source, resource=resource, concept=concept, groups=groups, date=when, current=current, **extra)

    # Each reader looks the codes up first (concept_groups is empty for anything but a coded concept):
    # most resources of a real record (vital signs, unrelated problems and drugs) are in no code group,
    # and for them nothing else (dates, values, supply) is read.

    def _condition(self, resource: dict) -> list[Item]:
        concept = resource.get("code")
        groups = self.codes.concept_groups(concept)
        if not groups:
            return []
        rules = self.status["condition"]
        if fv.status_code(resource.get("verificationStatus")) in rules["excluded_verification"]:
            return []
        clinical = fv.status_code(resource.get("clinicalStatus"))
        if clinical is None:
            abated = fv.parse_date(resource.get("abatementDateTime")) or fv.period_end(resource.get("abatementPeriod"))
            current = rules["missing_clinical_status_is_current"] and not (abated and abated <= self.today)
        else:
            current = clinical in rules["current_clinical"]
        when = (
            fv.parse_date(resource.get("onsetDateTime"))
            or fv.period_start(resource.get("onsetPeriod"))
            or fv.parse_date(resource.get("recordedDate"))
        )
        return [Item("Condition", resource, concept, groups, when, current)]

    def _observation(self, resource: dict) -> list[Item]:
        if fv.text(resource.get("status")) in self.status["observation"]["excluded"] or resource.get("dataAbsentReason") is not None:
            return []
        items: list[Item] = []
        when: Any = _UNREAD
        components = resource.get("component")
        parts = [resource] + [c for c in components if isinstance(c, dict)] if isinstance(components, list) else (resource,)
        for part in parts:
            if part is not resource and part.get("dataAbsentReason") is not None:
                continue
            concept = part.get("code")
            groups = self.codes.concept_groups(concept)
            if groups:
                if when is _UNREAD:
                    when = _observation_date(resource)
                positive, explicit = self._finding_value(part, resource)
                quantity = part.get("valueQuantity") if isinstance(part.get("valueQuantity"), dict) else None
                items.append(Item("Observation", resource, concept, groups, when, True,
                                  positive=positive, explicit_positive=explicit, quantity=quantity))
            value_concept = part.get("valueCodeableConcept")
            if isinstance(value_concept, dict):
                # A coded finding recorded as the value ("Clinical finding" = Saddle numbness)
                value_groups = self.codes.concept_groups(value_concept)
                if value_groups and not self._is_qualifier(value_concept):
                    if when is _UNREAD:
                        when = _observation_date(resource)
                    items.append(Item("Observation", resource, value_concept, value_groups, when, True,
                                      positive=True, explicit_positive=True))
        return items

    def _finding_value(self, part: dict, resource: dict) -> tuple[bool, bool]:
        """(positive, explicitly positive) for an Observation of a finding."""
        if part.get("valueBoolean") is False:
            return False, False
        if part.get("valueBoolean") is True:
            return True, True
        concept = part.get("valueCodeableConcept")
        if isinstance(concept, dict):
            if self._matches(concept, self.values["absent"]):
                return False, False
            if self._matches(concept, self.values["present"]):
                return True, True
        text = part.get("valueString")
        if isinstance(text, str):
            lowered = text.strip().lower()
            if lowered in ("absent", "no", "negative", "not present", "not detected", "none", "false"):
                return False, False
            if lowered in ("present", "yes", "positive", "detected", "true"):
                return True, True
        for interpretation in _list(resource.get("interpretation")):
            for coding in fv.codings(interpretation):
                if coding.get("code") in self.values["absent_interpretations"]:
                    return False, False
        return True, False

    def _is_qualifier(self, concept: dict) -> bool:
        return self._matches(concept, self.values["absent"]) or self._matches(concept, self.values["present"])

    @staticmethod
    def _matches(concept: dict, allowed: list[dict]) -> bool:
        return any(
            coding.get("code") == value["code"] and (coding.get("system") in (None, value["system"]))
            for coding in fv.codings(concept)
            for value in allowed
        )

    def _medication(self, resource: dict) -> list[Item]:
        status = fv.text(resource.get("status"))
        if status in self.status["medication"]["excluded"]:
            return []
        concept = resource.get("medicationCodeableConcept")
        if concept is None:
            concept = self._referenced_medication_code(resource)
        groups = self.codes.concept_groups(concept)
        if not groups:
            return []
        start, end = _medication_period(resource, self.today)
        return [Item(resource["resourceType"], resource, concept, groups, start, True, end=end, status=status)]

    def _referenced_medication_code(self, resource: dict) -> dict | None:
        reference = resource.get("medicationReference")
        target = reference.get("reference") if isinstance(reference, dict) else None
        if not isinstance(target, str):
            return None
        if target.startswith("#"):
            for contained in _list(resource.get("contained")):
                if isinstance(contained, dict) and contained.get("id") == target[1:]:
                    return contained.get("code")
            return None
        medication = self.medications.get(target) or self.medications.get("Medication/" + target.rsplit("/", 1)[-1])
        return medication.get("code") if medication else None

    def _procedure(self, resource: dict) -> list[Item]:
        status = fv.text(resource.get("status"))
        if status in self.status["procedure"]["excluded"]:
            return []
        concept = resource.get("code")
        groups = self.codes.concept_groups(concept)
        if not groups:
            return []
        when = (
            fv.parse_date(resource.get("performedDateTime"))
            or fv.period_start(resource.get("performedPeriod"))
            or fv.parse_date(resource.get("performedString"))
        )
        return [Item("Procedure", resource, concept, groups, when, True, status=status)]

    def _service_request(self, resource: dict) -> list[Item]:
        status = fv.text(resource.get("status"))
        if status in self.status["service_request"]["excluded"]:
            return []
        concept = resource.get("code")
        groups = self.codes.concept_groups(concept)
        if not groups:
            return []
        when = (
            fv.parse_date(resource.get("occurrenceDateTime"))
            or fv.period_start(resource.get("occurrencePeriod"))
            or fv.parse_date(resource.get("authoredOn"))
        )
        return [Item("ServiceRequest", resource, concept, groups, when, True, status=status)]

    def order_reason_items(self, order: dict) -> list[Item]:
        """The draft order's reasonCode: the ordering clinician's stated reason, current as of today."""
        items = []
        for concept in _list(order.get("reasonCode")):
            item = self._item(ORDER_REASON, order, concept, self.today)
            if item:
                items.append(item)
        return items


class _Evaluator:
    def __init__(self, knowledge: Knowledge, today: date, by_group: dict[str, list[Item]], age: int | None):
        self.knowledge = knowledge
        self.codes = knowledge.codes
        self.criteria = knowledge.criteria
        self.today = today
        self.by_group = by_group
        self.age = age

    # -- generic criteria ------------------------------------------------------------------------
    def findings(self, definitions: list[dict], kind: str) -> list[Finding]:
        """Evaluate criteria entries; entries sharing an id merge into one finding."""
        found: dict[str, Finding] = {}
        deferred = []
        for definition in definitions:
            if definition.get("requires_any"):
                deferred.append(definition)
                continue
            self._evaluate_into(definition, kind, found)
        for definition in deferred:
            present = set(found) | ({"AGE-ELDERLY"} if self._is_elderly() else set())
            if present & set(definition["requires_any"]):
                self._evaluate_into(definition, kind, found)
        return list(found.values())

    def _evaluate_into(self, definition: dict, kind: str, found: dict[str, Finding]) -> None:
        evidence, notes = self._evidence(definition)
        if not evidence:
            return
        finding = found.get(definition["id"])
        if finding is None:
            finding = Finding(
                id=definition["id"],
                rule=definition["rule"],
                label=definition["label"],
                kind=kind,
                protocol=definition.get("protocol"),
                fine_orders=tuple(definition.get("fine_orders", ())),
                guidelines=tuple(definition.get("guidelines", ())),
                urgent=bool(definition.get("urgent")),
            )
            found[definition["id"]] = finding
        elif definition["label"] not in finding.label:
            finding.label = f"{finding.label}; {definition['label']}"
        known = set(finding.evidence)
        for item in evidence:
            if item not in known:
                known.add(item)
                finding.evidence.append(item)
        finding.notes = tuple(sorted(set(finding.notes) | set(notes)))

    def _evidence(self, definition: dict) -> tuple[list[Evidence], list[str]]:
        kind = definition.get("kind", "coded")
        if kind == "age":
            enabled = self.criteria["policy"].get(definition["enabled_by_policy"], False)
            minimum = self.criteria["policy"][definition["min_age_from_policy"]]
            if enabled and self.age is not None and self.age >= minimum:
                return [Evidence(None, "Patient", f"Age {self.age}", None)], []
            return [], []
        items = self._candidates(definition)
        if kind == "measurement":
            return self._measurements(definition, items), []
        if kind == "medication_supply":
            return self._medication_supply(definition, items), []
        if kind == "medication_in_use":
            return self._medication_in_use(definition, items), []
        items = [i for i in items if self._status_and_window_ok(definition, i)]
        if definition.get("positive_only"):
            items = [i for i in items if i.explicit_positive]
        paired = definition.get("paired_codes")
        if paired:
            items = self._apply_pairs(paired, items)
        notes = []
        for caution in definition.get("caution_codes", ()):
            if any(self._has_code(i.concept, caution) for i in items):
                notes.append(caution["note"])
        return [self._to_evidence(i, definition) for i in items], notes

    def _candidates(self, definition: dict) -> list[Item]:
        sources = set(definition["sources"])
        items: list[Item] = []
        seen: set[int] = set()
        for group in definition.get("groups", ()):
            for item in self.by_group.get(group, ()):
                if item.source in sources and id(item) not in seen:
                    seen.add(id(item))
                    items.append(item)
        for code in definition.get("codes", ()):
            for group_items in self.by_group.values():
                for item in group_items:
                    if item.source in sources and id(item) not in seen and self._has_code(item.concept, code):
                        seen.add(id(item))
                        items.append(item)
        if "Observation" in sources:
            items = [i for i in items if i.source != "Observation" or i.positive]
        return items

    def _status_and_window_ok(self, definition: dict, item: Item) -> bool:
        status = definition.get("status", "current")
        window = definition.get("within_days")
        if item.source == "Procedure" and definition.get("procedure_status") and item.status:
            if item.status not in definition["procedure_status"]:
                return False
        in_window = window is None or self._within(item.date, window)
        if item.source != "Condition":
            return in_window
        if status == "any":
            return in_window
        if status == "current_or_recent":
            return item.current or (window is not None and self._within(item.date, window))
        return item.current and in_window

    def _within(self, when: date | None, days: int) -> bool:
        if when is None:
            return False  # an unknown date is unknown, not recent
        return (self.today - when).days <= days

    def _apply_pairs(self, paired: dict, items: list[Item]) -> list[Item]:
        pair_codes = paired["codes"]
        in_pair = [i for i in items if any(self._has_code(i.concept, c) for c in pair_codes)]
        others = [i for i in items if i not in in_pair]
        recent = [i for i in in_pair if self._within(i.date, paired["within_days"])]
        sides_found = {c["side"] for c in pair_codes for i in recent if self._has_code(i.concept, c)}
        if sides_found == {c["side"] for c in pair_codes}:
            return others + recent
        return others

    def _has_code(self, concept: dict, code: dict) -> bool:
        wanted = self.codes.groups(code["system"], code["code"])  # normalised comparison through the index
        for coding in fv.codings(concept):
            if coding.get("code") is None:
                continue
            if _normal(coding.get("code")) == _normal(code["code"]) and (
                coding.get("system") in (None, code["system"]) or self.codes.groups(coding.get("system"), coding.get("code")) == wanted
            ):
                return True
        return False

    def _measurements(self, definition: dict, items: list[Item]) -> list[Evidence]:
        threshold = definition["at_least"]
        evidence = []
        for item in items:
            if item.source != "Observation" or item.quantity is None or not self._within(item.date, definition["within_days"]):
                continue
            value = self._convert(item.quantity, threshold["unit"])
            if value is not None and value >= threshold["value"]:
                shown = f"{item.quantity.get('value')} {item.quantity.get('unit') or item.quantity.get('code') or ''}".strip()
                evidence.append(self._to_evidence(item, definition, value=shown))
        return evidence

    def _convert(self, quantity: dict, target: str) -> float | None:
        value = quantity.get("value")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return None
        units = self.criteria["units"]
        unit = quantity.get("code") or quantity.get("unit")
        if unit is None or (isinstance(unit, str) and not unit.strip()):
            if target == "Cel":
                unit = "[degF]" if value > units["unitless_temperature_fahrenheit_above"] else "Cel"
            else:
                unit = target
        for name, spec in units.items():
            if not isinstance(spec, dict):
                continue
            if unit == name or unit in spec["aliases"]:
                if name == target:
                    return float(value)
                if spec.get("to") == target:
                    return (float(value) + spec.get("offset", 0)) * spec.get("factor", 1)
                return None
        return None

    def _medication_supply(self, definition: dict, items: list[Item]) -> list[Evidence]:
        lookback_start = self.today - timedelta(days=definition["lookback_days"])
        intervals = []
        used = []
        for item in items:
            if item.source not in MEDICATION_TYPES or item.date is None or item.date > self.today:
                continue
            # Days of *supply* started in the look-back: a 90-day course prescribed 30 days ago is 90 days of
            # supply (criteria.md R10 ">= 90 d supply in last 365 d"), not 30 days elapsed. A course with no
            # recorded supply runs to today while active (see _medication_period).
            start, end = max(item.date, lookback_start), item.end or item.date
            if end < start:
                continue
            intervals.append((start, end))
            used.append(item)
        if _covered_days(intervals) >= definition["min_supply_days"]:
            return [self._to_evidence(i, definition) for i in used]
        return []

    def _medication_in_use(self, definition: dict, items: list[Item]) -> list[Evidence]:
        window_start = self.today - timedelta(days=definition["within_days"])
        evidence = []
        for item in items:
            if item.source not in MEDICATION_TYPES or item.date is None or item.date > self.today:
                continue
            if (item.end or item.date) >= window_start:
                evidence.append(self._to_evidence(item, definition))
        return evidence

    def _is_elderly(self) -> bool:
        return self.age is not None and self.age >= self.criteria["policy"]["elderly_age_years"]

    def _to_evidence(self, item: Item, definition: dict, value: str | None = None) -> Evidence:
        coding = None
        for group in definition.get("groups", ()):
            coding = self.codes.first_coding_in(item.concept, group)
            if coding:
                break
        reference = fv.reference_of(item.resource)
        return Evidence(
            reference=reference,
            resource_type=item.source,
            display=fv.concept_display(item.concept, coding),
            date=item.date,
            value=value,
        )

    # -- episode and conservative care -------------------------------------------------------------
    def episode(self, definition: dict) -> Episode | None:
        items = [i for i in self._candidates(definition) if self._status_and_window_ok(definition, i)]
        if not items:
            return None
        dated = [i.date for i in items if i.source == "Condition" and i.date is not None]
        return Episode(start=min(dated) if dated else None, evidence=[self._to_evidence(i, definition) for i in items])

    def conservative_care(self, definition: dict, episode: Episode | None) -> tuple[Finding | None, int | None]:
        if episode is None or episode.start is None:
            return None, None
        items = [
            i for i in self._candidates(definition)
            if i.date is not None and episode.start <= i.date <= self.today
        ]
        if not items:
            return None, None
        items.sort(key=lambda i: i.date)
        first = items[0]
        finding = Finding(
            id=definition["id"],
            rule=definition["rule"],
            label=definition["label"],
            kind="conservative-care",
            evidence=[self._to_evidence(i, definition) for i in items],
            protocol=definition.get("protocol"),
            fine_orders=tuple(definition.get("fine_orders", ())),
            guidelines=tuple(definition.get("guidelines", ())),
        )
        return finding, (self.today - first.date).days


def _observation_date(resource: dict) -> date | None:
    return (
        fv.parse_date(resource.get("effectiveDateTime"))
        or fv.period_end(resource.get("effectivePeriod"))
        or fv.period_start(resource.get("effectivePeriod"))
        or fv.parse_date(resource.get("effectiveInstant"))
        or fv.parse_date(resource.get("issued"))
    )


def _medication_period(resource: dict, today: date) -> tuple[date | None, date | None]:
    """Start and end of a medication's supply, from whatever the resource records."""
    effective_period = resource.get("effectivePeriod")
    dosage_bounds = None
    duration = None
    for dosage in _list(resource.get("dosageInstruction")) + _list(resource.get("dosage")):
        repeat = (dosage.get("timing") or {}).get("repeat") if isinstance(dosage, dict) and isinstance(dosage.get("timing"), dict) else None
        if isinstance(repeat, dict):
            dosage_bounds = dosage_bounds or repeat.get("boundsPeriod")
            duration = duration or fv.duration_days(repeat.get("boundsDuration"))
    dispense = resource.get("dispenseRequest") if isinstance(resource.get("dispenseRequest"), dict) else {}
    start = (
        fv.parse_date(resource.get("effectiveDateTime"))
        or fv.period_start(effective_period)
        or fv.period_start(dosage_bounds)
        or fv.parse_date(resource.get("authoredOn"))
        or fv.period_start(dispense.get("validityPeriod"))
        or fv.parse_date(resource.get("dateAsserted"))
    )
    if start is None:
        return None, None
    end = fv.period_end(effective_period) or fv.period_end(dosage_bounds)
    if end is None:
        supply = fv.duration_days(dispense.get("expectedSupplyDuration"))
        if supply is not None:
            repeats = dispense.get("numberOfRepeatsAllowed")
            fills = 1 + (repeats if isinstance(repeats, int) and repeats > 0 else 0)
            end = fv.add_days(start, supply * fills)
        elif duration is not None:
            end = fv.add_days(start, duration)
        elif fv.text(resource.get("status")) in ("active", "on-hold", "intended"):
            end = today
        else:
            end = start
    return start, max(end, start)


def _covered_days(intervals: list[tuple[date, date]]) -> int:
    """Days covered by the union of [start, end) intervals (a one-day course counts one day)."""
    total = 0
    current_start = current_end = None
    for start, end in sorted(intervals):
        end = max(end, start + timedelta(days=1))
        if current_end is None or start > current_end:
            if current_end is not None:
                total += (current_end - current_start).days
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += (current_end - current_start).days
    return total


def _find_patient(resources: list[dict]) -> dict | None:
    for resource in resources:
        if resource.get("resourceType") == "Patient":
            return resource
    return None


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _normal(code: Any) -> str:
    return str(code).replace(".", "").replace(" ", "").upper()
