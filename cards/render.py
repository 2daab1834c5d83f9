"""Assessment -> CDS Hooks 2.0 card. Pure: texts, links, override reasons and suggestions come from
cards/templates/*.yaml; this module fills them in.

Placeholders available to templates: {episode_days} {flags} {contrast_text} {modality_text}
{order_display} {recommended_display} {care_days} {plural} {unread} and, in detail texts, the
prepared paragraphs {evidence} {notes} {guideline_list} {features} {why} ... named in each template.
Every card carries: uuid, summary (< 140 characters), indicator, detail (GitHub-flavoured markdown,
no HTML), source {label, url, topic}, links to the guidelines, overrideReasons, and an `extension`
with the machine-readable assessment (rule, facts, evidence references, recommended protocol).
"""

from __future__ import annotations

import copy
import re
import uuid
from pathlib import Path
from typing import Any

import yaml

from fhir_mappings.facts import ClinicalFacts, Evidence, Finding
from fhir_mappings.knowledge import Knowledge

from .decide import CES, INCOMPLETE, INDICATED, NOT_INDICATED, Assessment

TEMPLATES_DIR = Path(__file__).with_name("templates")
CARD_TYPES = (CES, INDICATED, NOT_INDICATED, INCOMPLETE)


class CardRenderer:
    def __init__(self, knowledge: Knowledge, templates_dir: Path = TEMPLATES_DIR):
        self.knowledge = knowledge
        self.common = _load(templates_dir / "common.yaml")
        self.templates = {card_type: _load(templates_dir / f"{card_type}.yaml") for card_type in CARD_TYPES}
        self.namespace = uuid.UUID(self.common["uuid_namespace"])

    def render(self, assessment: Assessment, facts: ClinicalFacts, hook_instance: str) -> dict[str, Any] | None:
        if assessment.card_type is None:
            return None
        template = self.templates[assessment.card_type]
        card_uuid = str(uuid.uuid5(self.namespace, f"{hook_instance}|{_order_key(assessment, facts)}|{assessment.card_type}"))
        build = {
            CES: self._ces,
            INDICATED: self._indicated,
            NOT_INDICATED: self._not_indicated,
            INCOMPLETE: self._incomplete,
        }[assessment.card_type]
        summary, detail, suggestions, guidelines = build(assessment, facts, template)
        card: dict[str, Any] = {
            "uuid": card_uuid,
            "summary": self._fit(summary),
            "indicator": template["indicator"],
            "detail": _tidy(detail),
            "source": self._source(template, assessment.card_type),
            "links": [self._link(g) for g in guidelines],
            "overrideReasons": [
                {"system": self.common["override_reason_system"], "code": r["code"], "display": r["display"]}
                for r in template["override_reasons"]
            ],
            "extension": {self.common["extension_key"]: self._extension(assessment)},
        }
        if suggestions:
            for suggestion in suggestions:
                suggestion["uuid"] = str(uuid.uuid5(uuid.UUID(card_uuid), suggestion.pop("key")))
            card["selectionBehavior"] = "at-most-one"
            card["suggestions"] = suggestions
        return card

    # -- card types -------------------------------------------------------------------------------
    def _not_indicated(self, a: Assessment, facts: ClinicalFacts, t: dict):
        days = facts.episode_days or 0
        care_days = facts.conservative_care_days
        acute = days < self.knowledge.criteria["conservative_care"]["min_days"]
        variant_key = "acute" if acute else "no_trial"
        episode = facts.episode
        sentences = t["sentences"]
        episode_sentence = sentences["episode"].format(episode_days=days, since=_date(episode.start)) if episode and episode.start else ""
        if care_days is not None:
            care_sentence = sentences["care_started"].format(care_days=care_days)
        else:
            care_sentence = sentences["no_care"]
        notes = []
        if days <= self.knowledge.criteria["policy"]["hedis_note_within_days"]:
            notes.append(t["notes"]["hedis"])
        if any(word in e.display.lower() for word in t["sciatica_words"] for e in (episode.evidence if episode else [])):
            notes.append(t["notes"]["sciatica"])
        notes.extend(self._modifier_notes(facts, a))
        summary = t["summary"][variant_key].format(episode_days=days)
        detail = t["detail"].format(
            episode_sentence=episode_sentence,
            care_sentence=care_sentence,
            variant=t["variant"][variant_key],
            notes=_paragraphs(notes),
            evidence=_evidence_list([(self.common["evidence_labels"]["episode"], e) for e in (episode.evidence if episode else [])]
                                    + [(self.common["evidence_labels"]["conservative_care"], e)
                                       for e in (facts.conservative_care.evidence if facts.conservative_care else [])]),
            guideline_list=self._guideline_list(t["guidelines"]),
        )
        suggestions = []
        if a.order.reference:
            values = {"order_display": _plain(a.order.display)}
            suggestions = self._template_suggestions(t["suggestions"], values, a.order.reference,
                                                     lambda action: self._new_resource(action["resource"], facts, a))
        return summary, detail, suggestions, t["guidelines"]

    def _indicated(self, a: Assessment, facts: ClinicalFacts, t: dict):
        protocol = a.protocol
        flags_text = self._flags_text(a.findings)
        contrast_text = self.common["contrast_text"].get(protocol.contrast or "without", "")
        modality_text = self.common["modality_text"][protocol.modality]
        urgent = any(f.urgent for f in a.findings)
        values = {
            "flags": flags_text,
            "contrast_text": contrast_text,
            "modality_text": modality_text,
            "order_display": _plain(a.order.display),
        }
        if protocol.modality != "MR":
            summary_key = "as_ordered"
        else:
            summary_key = "urgent" if urgent else "recommend"
        kinds = {f.kind for f in a.findings}
        if "red-flag" in kinds:
            why = t["why"]["red-flag"].format(flags=_plain(", ".join(f.label for f in a.findings)), plural="s" if len(a.findings) > 1 else "")
        else:
            why = t["why"]["conservative-care"].format(care_days=facts.conservative_care_days)
        if protocol.modality == "MR":
            protocol_sentence = f"{modality_text} {contrast_text}. " + t["protocol_reason"][protocol.contrast]
            if protocol.gadolinium_withheld:
                protocol_sentence += " " + t["protocol_reason"]["pregnancy"]
        else:
            protocol_sentence = t["protocol_reason"]["as_ordered"].format(**values)
        order_sentence = (t["order_matches"] if protocol.order_is_fine else t["order_differs"]).format(**values)
        if protocol.modality == "MR" and a.order.modality != "MR" and (protocol.contrast == "with-and-without" or protocol.gadolinium_withheld):
            order_sentence += " " + t["mri_preferred"]
        notes = self._modifier_notes(facts, a)
        if a.unread:
            notes.append(self._unread_note(a.unread))
        guidelines = _unique(g for f in a.findings for g in f.guidelines)
        detail = t["detail"].format(
            why=why,
            protocol_sentence=protocol_sentence,
            order_sentence=order_sentence,
            urgent_sentence=t["urgent"] if urgent else "",
            notes=_paragraphs(notes),
            evidence=_evidence_list([(f.label, e) for f in a.findings for e in f.evidence]),
            guideline_list=self._guideline_list(guidelines),
        )
        summary = self._summary_with_flags(t["summary"][summary_key], values, a.findings)
        suggestions = []
        if not protocol.order_is_fine and a.order.reference:
            recommended = self._recommended_coding(a, protocol.contrast or "without")
            values["recommended_display"] = f"{self.common['modality_text']['MR']} {contrast_text}"
            suggestions = self._template_suggestions(t["suggestions"], values, a.order.reference,
                                                     lambda action: self._replacement_order(a, recommended, facts))
        return summary, detail, suggestions, guidelines

    def _ces(self, a: Assessment, facts: ClinicalFacts, t: dict):
        features = t["sentences"]["found"].format(features=_plain("; ".join(f.label for f in a.findings)))
        notes = [t["notes"][n] for f in a.findings for n in f.notes if n in t["notes"]]
        notes.extend(self._modifier_notes(facts, a))
        if facts.red_flags:
            notes.append(t["sentences"]["also_present"].format(flags=_plain(", ".join(f.label for f in facts.red_flags))))
        guidelines = list(self.knowledge.criteria["ces_guidelines"])
        detail = t["detail"].format(
            features=features,
            notes=_paragraphs(notes),
            evidence=_evidence_list([(f.label, e) for f in a.findings for e in f.evidence]),
            guideline_list=self._guideline_list(guidelines),
        )
        summary = t["summary"]["default"]
        values = {"order_display": _plain(a.order.display)}
        descriptions = t["action_descriptions"]
        mri_actions: list[dict] = []
        if a.order.reference:
            if a.order.modality == "MR":
                updated = copy.deepcopy(a.order.resource)
                updated["priority"] = "stat"
                mri_actions = [{"type": "update", "description": descriptions["update_to_stat"], "resource": updated}]
            else:
                mri = self._replacement_order(a, self._recommended_coding(a, a.protocol.contrast or "without"), facts, priority="stat")
                mri_actions = [
                    {"type": "delete", "description": descriptions["remove_order"].format(**values), "resourceId": a.order.reference},
                    {"type": "create", "description": descriptions["replace_with_mri"].format(**values), "resource": mri},
                ]
        referral = [{"type": "create", "description": descriptions["spinal_referral"],
                     "resource": self._new_resource("spinal_surgery_referral", facts, a)}]
        parts = {"emergency_mri": mri_actions, "spinal_referral": referral}
        suggestions = []
        for spec in t["suggestions"]:
            actions = [action for part in spec["actions"] for action in parts[part]]
            if actions and all(parts[p] for p in spec["actions"]):
                suggestions.append(self._suggestion(spec, values, actions))
        return summary, detail, suggestions, guidelines

    def _incomplete(self, a: Assessment, facts: ClinicalFacts, t: dict):
        labels = t["resource_labels"]
        unread_names = [labels.get(k, k) for k in a.unread]
        unread_short = ", ".join(unread_names[:2]) + (f" +{len(unread_names) - 2} more" if len(unread_names) > 2 else "")
        unread_list = "\n".join(f"- {labels.get(k, k)}: {_plain(v)}" for k, v in a.unread.items())
        found = ""
        if facts.episode:
            found = "\n" + _evidence_list([(self.common["evidence_labels"]["episode"], e) for e in facts.episode.evidence]) + "\n"
        detail = t["detail"].format(unread_list=unread_list, found=found, guideline_list=self._guideline_list(t["guidelines"]))
        return t["summary"]["default"].format(unread=unread_short or "part of the record"), detail, [], t["guidelines"]

    # -- pieces -------------------------------------------------------------------------------------
    def _source(self, template: dict, card_type: str) -> dict:
        guideline = self.knowledge.guideline(template["source_guideline"])
        return {
            "label": template["source_label"],
            "url": guideline["url"],
            "topic": {"system": self.common["topic_system"], "code": card_type, "display": template["topic_display"]},
        }

    def _link(self, guideline_id: str) -> dict:
        guideline = self.knowledge.guideline(guideline_id)
        return {"label": guideline["label"], "url": guideline["url"], "type": "absolute"}

    def _guideline_list(self, guideline_ids: list[str]) -> str:
        return "; ".join(self.knowledge.guideline(g)["citation"].rstrip(".") for g in guideline_ids) + "."

    def _extension(self, a: Assessment) -> dict:
        findings = a.findings + a.also
        extension: dict[str, Any] = {
            "rule": a.rule,
            "order": a.order.reference,
            "facts": _unique(f.id for f in findings),
            "evidence": _unique(e.reference for f in findings for e in f.evidence if e.reference),
            "knowledgeVersion": self.knowledge.version,
        }
        if a.protocol:
            extension["recommendedProtocol"] = {"modality": a.protocol.modality, "contrast": a.protocol.contrast, "orderMatches": a.protocol.order_is_fine}
        if a.unread:
            extension["unread"] = sorted(a.unread)
        return extension

    def _template_suggestions(self, specs: list[dict], values: dict, order_reference: str, new_resource) -> list[dict]:
        """Suggestions from a template: `delete` removes the draft order, `create` adds new_resource(action)."""
        suggestions = []
        for spec in specs:
            actions = []
            for action in spec["actions"]:
                description = action["description"].format(**values)
                if action["type"] == "delete":
                    actions.append({"type": "delete", "description": description, "resourceId": order_reference})
                else:
                    actions.append({"type": "create", "description": description, "resource": new_resource(action)})
            suggestions.append(self._suggestion(spec, values, actions))
        return suggestions

    def _suggestion(self, spec: dict, values: dict, actions: list[dict]) -> dict:
        suggestion = {"key": spec["key"], "label": spec["label"].format(**values), "actions": actions}
        if spec.get("recommended"):
            suggestion["isRecommended"] = True
        return suggestion

    def _flags_text(self, findings: list[Finding]) -> str:
        labels = [_short_label(f.label) for f in findings]
        return ", ".join(labels)

    def _summary_with_flags(self, template: str, values: dict, findings: list[Finding]) -> str:
        """The summary with as many flag names as fit: the advice after them must never be cut off."""
        labels = [_short_label(f.label) for f in findings]
        limit = self.common["summary_max_chars"]
        for shown in range(len(labels), 0, -1):
            flags = ", ".join(labels[:shown]) + (f" +{len(labels) - shown} more" if shown < len(labels) else "")
            summary = template.format(**{**values, "flags": flags})
            if len(summary) <= limit:
                return summary
        return template.format(**{**values, "flags": f"{len(labels)} red flags"})

    def _fit(self, summary: str) -> str:
        limit = self.common["summary_max_chars"]
        if len(summary) <= limit:
            return summary
        return summary[: limit - 1].rstrip(" ,.;:") + "…"

    def _modifier_notes(self, facts: ClinicalFacts, a: Assessment) -> list[str]:
        notes = []
        if facts.has_modifier("MOD-PREGNANCY"):
            notes.append("**Pregnancy:** prefer MRI without gadolinium unless essential; avoid ionising radiation (radiography, CT).")
        if facts.has_modifier("MOD-PAD"):
            notes.append("**Vascular mimic:** peripheral arterial disease is recorded; leg pain on walking may be vascular claudication, so check pulses and ankle-brachial index.")
        return notes

    def _unread_note(self, unread: dict[str, str]) -> str:
        labels = self.templates[INCOMPLETE]["resource_labels"]
        return "**Not read:** " + ", ".join(labels.get(k, k) for k in unread) + " could not be read; other red flags may be missing from this assessment."

    def _recommended_coding(self, a: Assessment, contrast: str) -> dict:
        options = self.knowledge.criteria["orders"]["recommended_codes"]["MR"][contrast]
        system = a.order.coding.get("system")
        for option in options:
            if option["system"] == system:
                return dict(option)
        return dict(options[0])

    def _replacement_order(self, a: Assessment, coding: dict, facts: ClinicalFacts, priority: str | None = None) -> dict:
        original = a.order.resource
        order: dict[str, Any] = {
            "resourceType": "ServiceRequest",
            "status": "draft",
            "intent": original.get("intent") if isinstance(original.get("intent"), str) else "order",
            "code": {"coding": [coding], "text": coding["display"]},
        }
        for name in ("subject", "encounter", "requester", "reasonCode", "reasonReference", "category", "priority"):
            if original.get(name):
                order[name] = copy.deepcopy(original[name])
        if "subject" not in order and facts.patient_reference:  # ServiceRequest.subject is 1..1
            order["subject"] = {"reference": facts.patient_reference}
        if priority:
            order["priority"] = priority
        return order

    def _new_resource(self, name: str, facts: ClinicalFacts, a: Assessment) -> dict:
        resource = copy.deepcopy(self.common["resources"][name])
        subject = a.order.resource.get("subject")
        if isinstance(subject, dict) and subject.get("reference"):
            resource["subject"] = copy.deepcopy(subject)
        elif facts.patient_reference:
            resource["subject"] = {"reference": facts.patient_reference}
        if a.order.resource.get("reasonCode"):
            resource["reasonCode"] = copy.deepcopy(a.order.resource["reasonCode"])
        return resource


def _order_key(a: Assessment, facts: ClinicalFacts) -> str:
    """The order's reference, or its position among the draft orders when it has no id (unique card uuids)."""
    if a.order.reference:
        return a.order.reference
    position = next((i for i, order in enumerate(facts.orders) if order is a.order), 0)
    return f"draft-order-{position}"


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]<>#|~])")


def _plain(text: str) -> str:
    """Record text made safe for GitHub-flavoured markdown: no HTML, no links, no emphasis."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def _short_label(label: str) -> str:
    return label.split(";")[0].split(" (")[0]


def _date(value) -> str:
    return value.isoformat() if value else "date not recorded"


def _evidence_list(rows: list[tuple[str, Evidence]]) -> str:
    lines = []
    for label, e in rows:
        when = f", {e.date.isoformat()}" if e.date else ""
        value = f" {_plain(e.value)}" if e.value else ""
        source = "order reason" if e.resource_type == "OrderReason" else e.resource_type
        reference = f" `{e.reference}`" if e.reference and e.resource_type != "OrderReason" else ""
        lines.append(f"- {_plain(label)}: {_plain(e.display)}{value} ({source}{when}){reference}")
    return "\n".join(lines) if lines else "- (none)"


def _paragraphs(notes: list[str]) -> str:
    return "\n\n".join(notes)


def _tidy(detail: str) -> str:
    """Markdown paragraphs: no trailing spaces, one blank line between paragraphs (an empty slot of a template,
    a note that does not apply, leaves none)."""
    lines = [line.rstrip() for line in detail.strip().splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines))


def _unique(values) -> list:
    seen: list = []
    for value in values:
        if value not in seen:
            seen.append(value)
    return seen
