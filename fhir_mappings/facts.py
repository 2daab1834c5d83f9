"""FHIR R4 resources -> clinical facts for the lumbar imaging criteria. Pure: no I/O, no HTTP.

Every resource is first read into `Item`s (one coded thing with its date, status and value), after the
status filters of criteria.yaml; entered-in-error and refuted data never become items. The criteria
(cauda equina features, red flags, conservative care, modifiers) are then evaluated over the items.
Every fact keeps the evidence (FHIR reference, display, date) behind it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date, timedelta
from functools import lru_cache
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
    "resourceType", "id", "status", "code", "bodySite", "birthDate",
    "clinicalStatus", "verificationStatus", "onsetDateTime", "onsetPeriod", "onsetAge", "onsetRange", "onsetString",
    "recordedDate", "abatementDateTime", "abatementPeriod", "abatementAge", "abatementRange", "abatementString", "abatementBoolean",
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


@dataclass
class Episode:
    start: date | None  # as written
    evidence: list[Evidence]
    earliest_start: date | None = None  # the first day the start can mean (set whenever start is)


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
    date: date | None  # as written (a partial date's first day): durations count from it
    current: bool  # Conditions: clinical status current; others: True after the status filters
    positive: bool = True  # Observations of findings: False when valued absent/negative
    explicit_positive: bool = False  # Observation explicitly valued present/positive
    quantity: dict | None = None  # Observation valueQuantity
    end: date | None = None  # medications: end of supply
    status: str | None = None
    earliest: date | None = None  # the first day its date can mean (a time zone's UTC day may be earlier)
    latest: date | None = None  # the last day its date can mean (a partial date, a UTC day): recency windows

    @property
    def first_day(self) -> date | None:
        return self.earliest or self.date

    @property
    def last_day(self) -> date | None:
        return self.latest or self.date


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

    patient = reader.patient
    age = _age(reader.patient, today, criteria["policy"]["adult_age_years"])
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
    named_entries = False  # whether the selections name any draft entry (a ServiceRequest or not)
    entries = draft_orders.get("entry") if isinstance(draft_orders, dict) else None
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict) or not isinstance(entry.get("resource"), dict):
            continue
        resource = entry["resource"]
        names = {fv.reference_of(resource) or "", fv.text(resource.get("id")) or "", fv.text(entry.get("fullUrl")) or ""} - {""}
        named_entries = named_entries or bool(selections and names & set(selections))
        if resource.get("resourceType") != "ServiceRequest" or fv.text(resource.get("status")) in excluded:
            continue
        candidates.append((resource, names))
    if selections and named_entries:
        # the clinician selected other orders (a drug, say): the imaging drafts are advised on at their turn or
        # at order-sign. Selections that name no entry at all: every draft is evaluated (never miss a cauda
        # equina order because a client wrote its references differently).
        candidates = [(r, n) for r, n in candidates if n & set(selections)]
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
                )
                break
        if order:
            orders.append(order)
        else:
            out_of_scope.append(fv.reference_of(resource) or "ServiceRequest")
    return orders, out_of_scope


def order_reasons(order: dict, record: set[str]) -> list[dict]:
    """The reasons a draft order states, as CodeableConcepts: its reasonCode, and its reasonReference - the code
    of a contained Condition or Observation ("#id"), else the reference's display (matched by name) when the
    resource is not in the `record` (references "Type/id"): a record resource is read with its statuses."""
    reasons = [c for c in _list(order.get("reasonCode")) if isinstance(c, dict)]
    contained = {c.get("id"): c for c in _list(order.get("contained")) if isinstance(c, dict) and isinstance(c.get("id"), str)}
    for reference in _list(order.get("reasonReference")):
        if not isinstance(reference, dict):
            continue
        target = reference.get("reference")
        resource = contained.get(target[1:]) if isinstance(target, str) and target.startswith("#") else None
        if resource is not None and isinstance(resource.get("code"), dict):
            reasons.append(resource["code"])
        elif isinstance(target, str) and "/".join(target.split("/")[-2:]) in record:
            continue
        elif isinstance(reference.get("display"), str) and reference["display"].strip():
            reasons.append({"text": reference["display"]})
    return reasons


class _ItemReader:
    """Reads resources into items, applying the status filters of criteria.yaml."""

    def __init__(self, knowledge: Knowledge, today: date, resources: list[dict]):
        self.codes = knowledge.codes
        self.status = knowledge.criteria["status"]
        self.values = knowledge.criteria["finding_values"]
        self.today = today
        self.medications = {fv.reference_of(r): r for r in resources if r.get("resourceType") == "Medication" and r.get("id")}
        self.references = {reference for r in resources if (reference := fv.reference_of(r))}
        self.patient = _find_patient(resources)
        self.birth_date = fv.parse_date(self.patient.get("birthDate")) if self.patient else None
        self.items: list[Item] = []
        readers = {
            "Condition": self._condition,
            "Observation": self._observation,
            "MedicationRequest": self._medication,
            "MedicationStatement": self._medication,
            "Procedure": self._act,
            "ServiceRequest": self._act,
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
            current = rules["missing_clinical_status_is_current"] and not self._abated(resource)
        else:
            current = clinical in rules["current_clinical"]
        onset_range = resource.get("onsetRange")
        at_age = (
            fv.date_at_age(self.birth_date, resource.get("onsetAge")),  # the earliest day the age can mean
            fv.date_at_age(self.birth_date, onset_range.get("low") if isinstance(onset_range, dict) else None),
        )
        spans = [
            fv.date_span(resource.get("onsetDateTime")),
            fv.period_start_span(resource.get("onsetPeriod")),
            *(fv.DateSpan(day, day, day) if day else None for day in at_age),
            fv.date_span(resource.get("onsetString")),
            fv.date_span(resource.get("recordedDate")),
        ]
        # The first date recorded. An onset after today is an entry error: the next date, else none - a sign
        # dated tomorrow is present now (recent for the windows), an episode starting tomorrow has no known start.
        span = next((span for span in spans if span is not None and span.first <= self.today), None)
        written, earliest, latest = (span.written, span.first, span.last) if span else (None, None, None)
        if span is None and any(spans):
            latest = self.today
        if clinical in rules["undated_return"]:
            latest = self.today  # it came back, and the onset dates its first occurrence: the return is recent
        return [Item("Condition", resource, concept, groups, written, current, earliest=earliest, latest=latest)]

    def _abated(self, resource: dict) -> bool:
        """Whether a Condition records its end, in any of abatement[x]'s forms, on or before today."""
        abatement_range = resource.get("abatementRange")
        ended = (
            fv.parse_date(resource.get("abatementDateTime"))
            or fv.period_end(resource.get("abatementPeriod"))
            or fv.date_at_age(self.birth_date, resource.get("abatementAge"))
            or fv.date_at_age(self.birth_date, abatement_range.get("high") if isinstance(abatement_range, dict) else None)
        )
        if ended is not None:
            return ended <= self.today
        text = resource.get("abatementString")
        return resource.get("abatementBoolean") is True or (isinstance(text, str) and bool(text.strip()))

    def _observation(self, resource: dict) -> list[Item]:
        if fv.text(resource.get("status")) in self.status["observation"]["excluded"] or resource.get("dataAbsentReason") is not None:
            return []
        items: list[Item] = []
        when: Any = _UNREAD  # the Observation's DateSpan (or None), read once the first part is in a code group
        components = resource.get("component")
        parts = [resource] + [c for c in components if isinstance(c, dict)] if isinstance(components, list) else (resource,)
        for part in parts:
            if part is not resource and part.get("dataAbsentReason") is not None:
                continue
            concept = part.get("code")
            groups = self.codes.concept_groups(concept)
            if groups:
                if when is _UNREAD:
                    when = _observation_span(resource)
                positive, explicit = self._finding_value(part, resource)
                quantity = part.get("valueQuantity")
                if not isinstance(quantity, dict):
                    quantity = fv.quantity_from_text(part.get("valueString"))
                items.append(Item("Observation", resource, concept, groups, current=True, **_dated(when),
                                  positive=positive, explicit_positive=explicit, quantity=quantity))
            value_concept = part.get("valueCodeableConcept")
            if not isinstance(value_concept, dict) and isinstance(part.get("valueString"), str):
                value_concept = {"text": part["valueString"]}  # a finding written as the answer ("IVDU - injects daily")
            if isinstance(value_concept, dict):
                # A coded finding recorded as the value ("Clinical finding" = Saddle numbness)
                value_groups = self.codes.concept_groups(value_concept)
                if value_groups and not self._is_qualifier(value_concept):
                    if when is _UNREAD:
                        when = _observation_span(resource)
                    items.append(Item("Observation", resource, value_concept, value_groups, current=True, **_dated(when),
                                      positive=True, explicit_positive=True))
        return items

    def _finding_value(self, part: dict, resource: dict) -> tuple[bool, bool]:
        """(positive, explicitly positive) for an Observation of a finding. A value and an interpretation that
        disagree (valueBoolean false, interpretation positive) count as positive: a sign is not hidden on a conflict."""
        interpretations = {coding.get("code") for concept in _list(resource.get("interpretation")) for coding in fv.codings(concept)}
        if part.get("valueBoolean") is False:
            flagged = not interpretations.isdisjoint(self.values["present_interpretations"])
            return (True, True) if flagged else (False, False)
        if part.get("valueBoolean") is True:
            return True, True
        concept = part.get("valueCodeableConcept")
        texts = [part.get("valueString")]
        if isinstance(concept, dict):
            if self._matches(concept, self.values["absent"]):
                return False, False
            if self._matches(concept, self.values["present"]):
                return True, True
            texts += [concept.get("text"), *(coding.get("display") for coding in fv.codings(concept))]
        for text in texts:
            if isinstance(text, str):
                lowered = text.strip().lower()
                if lowered in self.values["absent_words"]:
                    return False, False
                if lowered in self.values["present_words"]:
                    return True, True
        if not interpretations.isdisjoint(self.values["absent_interpretations"]):
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
        routes = [route for dosage in _list(resource.get("dosageInstruction")) + _list(resource.get("dosage"))
                  if isinstance(dosage, dict) for route in (dosage.get("route"),) if isinstance(route, dict)]
        if routes:  # a topical or inhaled route makes it no systemic therapy, whatever the drug's code
            groups = groups - self.codes.route_exclusions(routes)
        if not groups:
            return []
        start, end = _medication_period(resource, self.today)
        return [Item(resource["resourceType"], resource, concept, groups, start and start.written, True, end=end,
                     status=status, earliest=start and start.first)]

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
        # "Medication/1", "https://ehr/fhir/Medication/1", or a transaction's "urn:uuid:<id>" (the id is the uuid)
        medication = self.medications.get(target) or self.medications.get("Medication/" + target.rsplit("/", 1)[-1].rsplit(":", 1)[-1])
        if medication:
            return medication.get("code")
        display = reference.get("display")
        return {"text": display} if isinstance(display, str) and display.strip() else None  # the drug named, not sent

    # Procedure and ServiceRequest: a coded act with a status and a date, the first of three elements present
    # (criteria.md section 4: "Procedure/ServiceRequest = performed/authored"; a referral documents the start of
    # conservative care when it is written, whatever its appointment date).
    _ACTS = {
        "Procedure": ("procedure", ("performedDateTime", "performedPeriod", "performedString")),
        "ServiceRequest": ("service_request", ("authoredOn", "occurrenceDateTime", "occurrencePeriod")),
    }

    def _act(self, resource: dict) -> list[Item]:
        status_rules, date_elements = self._ACTS[resource["resourceType"]]
        status = fv.text(resource.get("status"))
        if status in self.status[status_rules]["excluded"]:
            return []
        concept = resource.get("code")
        groups = self.codes.concept_groups(concept)
        if not groups:
            return []
        span = None
        for element in date_elements:
            value = resource.get(element)
            span = fv.period_start_span(value) if element.endswith("Period") else fv.date_span(value)
            if span:
                break
        return [Item(resource["resourceType"], resource, concept, groups, current=True, status=status, **_dated(span))]

    def order_reason_items(self, order: dict) -> list[Item]:
        """The draft order's reasonCode: the ordering clinician's stated reason, current as of today."""
        items = []
        for concept in order_reasons(order, self.references):
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
        in_window = window is None or self._within(item, window)
        if item.source != "Condition":
            return in_window
        if status == "any":
            return in_window
        if status == "current_or_recent":
            return item.current or (window is not None and self._within(item, window))
        return item.current and in_window

    def _within(self, item: Item, days: int) -> bool:
        """Whether the item is dated at most `days` before today, by the last day its date can mean."""
        when = item.last_day
        if when is None:
            return False  # an unknown date is unknown, not recent
        return (self.today - when).days <= days

    def _apply_pairs(self, paired: dict, items: list[Item]) -> list[Item]:
        """Findings that count only together (a right and a left foot drop): the members of the paired group
        count when every side is present and the deficit became bilateral within the window, i.e. some side
        began within it (an old right foot drop with a new left one is a new bilateral deficit; a side of
        unknown onset is present, just not known to be new). Other items are kept as they are."""
        members = [i for i in items if paired["group"] in i.groups]
        others = [i for i in items if paired["group"] not in i.groups]
        sides = {id(i): self._sides(i, paired["codes"]) for i in members}
        sided = [i for i in members if sides[id(i)]]
        needed = {code["side"] for code in paired["codes"]}
        if needed <= set().union(*sides.values()) and any(self._within(i, paired["within_days"]) for i in sided):
            return others + sided
        return others

    def _sides(self, item: Item, pair_codes: list[dict]) -> set[str]:
        """The sides a finding names: by its code (M21.371 right), else by its bodySite or its own words."""
        by_code = {code["side"] for code in pair_codes if self._has_code(item.concept, code)}
        if by_code:
            return by_code
        texts = [fv.concept_display(item.concept)]
        codes: set[str] = set()
        for site in _list(item.resource.get("bodySite")) if item.source != ORDER_REASON else []:
            texts.append(fv.concept_display(site))
            codes |= {c.get("code") for c in fv.codings(site) if isinstance(c.get("code"), str)}
        found: set[str] = set()
        for side, spec in self.criteria["laterality"].items():
            words = _whole_words(tuple(spec["words"]))
            if codes & set(spec["codes"]) or any(words.search(text) for text in texts if text):
                found |= {"right", "left"} if side == "both" else {side}
        return found

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
            if item.source != "Observation" or item.quantity is None or not self._within(item, definition["within_days"]):
                continue
            if item.quantity.get("comparator") in ("<", "<="):
                continue  # "<200 mL" never meets an at-least threshold
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
        wanted = unit.strip().casefold() if isinstance(unit, str) else None  # "DegF", "CEL": EHRs vary the case
        for name, spec in units.items():
            if not isinstance(spec, dict):
                continue
            if wanted in (name.casefold(), *(alias.casefold() for alias in spec["aliases"])):
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
        courses: set[tuple] = set()
        for item in items:
            if item.source not in MEDICATION_TYPES or item.date is None or item.first_day > self.today:
                continue
            # Days of *supply* started in the look-back: a 90-day course prescribed 30 days ago is 90 days of
            # supply (criteria.md R10 ">= 90 d supply in last 365 d"), not 30 days elapsed. A course with no
            # recorded supply runs to today while active (see _medication_period).
            start, end = max(item.date, lookback_start), item.end or item.date
            if end < start:
                continue
            # the same drug prescribed on the same day for the same supply is one prescription sent twice (an
            # EHR's copy and an exchange's copy), not an early refill
            course = (item.source, fv.concept_display(item.concept).casefold(), item.date, end)
            if course in courses:
                continue
            courses.add(course)
            intervals.append((start, end, item.source == "MedicationRequest"))
            used.append(item)
        if _supply_days(intervals) >= definition["min_supply_days"]:
            return [self._to_evidence(i, definition) for i in used]
        return []

    def _medication_in_use(self, definition: dict, items: list[Item]) -> list[Evidence]:
        window_start = self.today - timedelta(days=definition["within_days"])
        evidence = []
        for item in items:
            if item.source not in MEDICATION_TYPES or item.date is None or item.first_day > self.today:
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
        dated = [i for i in items if i.source == "Condition" and i.date is not None]
        return Episode(
            start=min(i.date for i in dated) if dated else None,
            evidence=[self._to_evidence(i, definition) for i in items],
            earliest_start=min(i.first_day for i in dated) if dated else None,
        )

    def conservative_care(self, definition: dict, episode: Episode | None) -> tuple[Finding | None, int | None]:
        if episode is None or episode.start is None:
            return None, None
        items = [
            i for i in self._candidates(definition)
            # started on or after the onset (on a day both dates can mean: time zones), and not in the future
            if i.date is not None and episode.earliest_start <= i.last_day and i.first_day <= self.today
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


def _dated(span: fv.DateSpan | None) -> dict[str, date | None]:
    """An Item's date fields from the days its date can mean (all None when it has no readable date)."""
    if span is None:
        return {"date": None, "earliest": None, "latest": None}
    return {"date": span.written, "earliest": span.first, "latest": span.last}


def _observation_span(resource: dict) -> fv.DateSpan | None:
    """The days an Observation's effective time (else its issue time) can mean."""
    return (
        fv.date_span(resource.get("effectiveDateTime"))
        or fv.period_end_span(resource.get("effectivePeriod"))
        or fv.period_start_span(resource.get("effectivePeriod"))
        or fv.date_span(resource.get("effectiveInstant"))
        or fv.date_span(resource.get("issued"))
    )


def _age(patient: dict | None, today: date, adult_age: int) -> int | None:
    """Age in years from the first day the birthDate can mean; None (unknown) when a partial birthDate
    ("2008-03") leaves it open whether the patient is an adult."""
    birth_date = patient.get("birthDate") if patient else None
    oldest = fv.age_in_years(fv.parse_date(birth_date), today)
    youngest = fv.age_in_years(fv.latest_date(birth_date), today)
    if oldest is not None and youngest is not None and youngest < adult_age <= oldest:
        return None
    return oldest


def _medication_period(resource: dict, today: date) -> tuple[fv.DateSpan | None, date | None]:
    """Start (the days it can mean) and end of a medication's supply, from whatever the resource records."""
    effective_period = resource.get("effectivePeriod")
    dosage_bounds = None
    duration = None
    for dosage in _list(resource.get("dosageInstruction")) + _list(resource.get("dosage")):
        repeat = (dosage.get("timing") or {}).get("repeat") if isinstance(dosage, dict) and isinstance(dosage.get("timing"), dict) else None
        if isinstance(repeat, dict):
            dosage_bounds = dosage_bounds or repeat.get("boundsPeriod")
            duration = duration or fv.duration_days(repeat.get("boundsDuration"))
    dispense = resource.get("dispenseRequest") if isinstance(resource.get("dispenseRequest"), dict) else {}
    span = (
        fv.date_span(resource.get("effectiveDateTime"))
        or fv.period_start_span(effective_period)
        or fv.period_start_span(dosage_bounds)
        or fv.date_span(resource.get("authoredOn"))
        or fv.period_start_span(dispense.get("validityPeriod"))
        or fv.date_span(resource.get("dateAsserted"))
    )
    if span is None:
        return None, None
    start = span.written
    end = fv.period_end(effective_period) or fv.period_end(dosage_bounds)
    if end is None:
        supply = fv.duration_days(dispense.get("expectedSupplyDuration"))
        if supply is None:
            dosages = _list(resource.get("dosageInstruction"))
            supply = fv.supply_days_from_quantity(dispense.get("quantity"), dosages[0] if dosages else None)
        if supply is not None:
            repeats = dispense.get("numberOfRepeatsAllowed")
            fills = 1 + (repeats if isinstance(repeats, int) and repeats > 0 else 0)
            end = fv.add_days(start, supply * fills)
        elif duration is not None:
            end = fv.add_days(start, duration)
        elif fv.period_end(dispense.get("validityPeriod")) is not None:
            end = min(fv.period_end(dispense.get("validityPeriod")), today)  # the order's end as some EHRs record it
        elif fv.text(resource.get("status")) in ("active", "on-hold", "intended"):
            end = today
        else:
            end = start
    return span, max(end, start)


def _supply_days(intervals: list[tuple[date, date, bool]]) -> int:
    """Days of supply: prescriptions (True) add up, an early refill starting when the previous supply ends
    (the usual days-supply count: two overlapping 45-day supplies are 90 days); statements of use (False)
    count the days they cover that no prescription does (a statement often records the same course)."""
    shifted: list[tuple[date, date]] = []
    next_free: date | None = None
    for start, end, prescribed in sorted(intervals):
        if not prescribed:
            continue
        length = max(end, start + timedelta(days=1)) - start
        if next_free is not None and start < next_free:
            start = next_free
        shifted.append((start, start + length))
        next_free = start + length
    return _covered_days(shifted + [(start, end) for start, end, prescribed in intervals if not prescribed])


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


@lru_cache(maxsize=32)
def _whole_words(words: tuple[str, ...]) -> re.Pattern[str]:
    """Any of `words` as a whole word, any case (compiled once per list of criteria.yaml)."""
    return re.compile(r"\b(?:" + "|".join(map(re.escape, words)) + r")\b", re.IGNORECASE)


def _find_patient(resources: list[dict]) -> dict | None:
    for resource in resources:
        if resource.get("resourceType") == "Patient":
            return resource
    return None


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _normal(code: Any) -> str:
    return str(code).replace(".", "").replace(" ", "").upper()
