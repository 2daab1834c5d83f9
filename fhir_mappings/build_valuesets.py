"""Build valuesets/<GROUP>.json (one FHIR R4 ValueSet per code group) from the two reviewed inputs:

  source/code-groups.json   the enumerated, source-cited codes (copy of the clinical team's file)
  valueset_rules.yaml       hand-reviewed additions: ICD-10 hierarchy rules, exclusions, extra codes and groups,
                            medication names, code-system aliases, release version and date

Usage:
  python -m fhir_mappings.build_valuesets               write valuesets/ (and remove files of groups that are gone)
  python -m fhir_mappings.build_valuesets --check       exit 1 when valuesets/ differs from what the inputs say
  python -m fhir_mappings.build_valuesets --out DIR     write elsewhere

The output is deterministic (fixed timestamp from the rules file, stable order), so a rebuild is byte-identical.
Nothing of code-groups.json is lost: group attributes become ValueSet extensions, per-code attributes become
extensions on expansion.contains (CodeIndex.group_meta / group_codes read them back).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from fhir_mappings.codes import (
    CODE_ATTRIBUTE_EXTENSIONS,
    EXT_GROUP_PREFIX,
    EXT_NAME_MATCH,
    EXT_NOTE,
    EXT_SYSTEM_ALIAS,
    normalise_code,
)

HERE = Path(__file__).parent
SOURCE_FILE = HERE / "source" / "code-groups.json"
RULES_FILE = HERE / "valueset_rules.yaml"
OUT_DIR = HERE / "valuesets"
UNCLOSED = "http://hl7.org/fhir/StructureDefinition/valueset-unclosed"  # core extension: expansion is partial


def build(source: dict[str, Any], rules: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{file name: ValueSet} for every group of the source plus the new groups of the rules file."""
    systems = {name: entry["uri"] for name, entry in rules["systems"].items()}
    aliases = {entry["uri"]: entry["aliases"] for entry in rules["systems"].values()}
    exclude_all = rules.get("medication_exclude_words_all", [])
    unknown = set(source["groups"]) - set(rules["groups"])
    if unknown:
        raise ValueError(f"groups without an entry (title) in the rules file: {sorted(unknown)}")
    result = {}
    for name, group_rules in rules["groups"].items():
        group_rules = group_rules or {}
        if name in source["groups"]:
            group = {**source["groups"][name], "codes": list(source["groups"][name]["codes"])}
            if "attributes" in group_rules:
                raise ValueError(f"{name}: attributes of a code-groups.json group belong in code-groups.json")
        elif "attributes" in group_rules:
            group = {**group_rules["attributes"], "codes": []}
        else:
            raise ValueError(f"{name}: not in code-groups.json and no attributes (a new group needs role etc.)")
        for added in group_rules.get("add_codes", []):
            group["codes"].append({**added, "system": _system(systems, added["system"], name)})
        name_rules = []  # one name-match extension each: a group may have medication and finding names
        medication = group_rules.get("medication_names")
        finding = group_rules.get("finding_names")
        if medication is not None:
            name_rules.append({"names": medication["ingredients"],
                               "exclude_words": [*medication.get("exclude_words", []), *exclude_all], "stop_codes": True})
        if finding is not None:
            name_rules.append({"names": finding.get("names", []),
                               "exclude_words": [*finding.get("exclude_words", []), *rules.get("finding_exclude_words_all", [])],
                               "site_names": finding.get("site_names", []), "site_words": finding.get("site_words", [])})
            if bool(finding.get("site_names")) != bool(finding.get("site_words")):
                raise ValueError(f"{name}: finding_names.site_names and site_words go together")
        patterns = {_system(systems, key, name): value for key, value in (group_rules.get("patterns") or {}).items()}
        valueset = _valueset(name, group, group_rules, patterns, name_rules, aliases, rules["release"],
                             source["meta"]["licensing"])
        _check(name, group["codes"], patterns)
        result[f"{name}.json"] = valueset
    return result


def render(valueset: dict[str, Any]) -> str:
    return json.dumps(valueset, indent=2, ensure_ascii=False) + "\n"


def load_inputs(source_file: Path = SOURCE_FILE, rules_file: Path = RULES_FILE) -> tuple[dict, dict]:
    source = json.loads(source_file.read_text(encoding="utf-8"))
    rules = yaml.safe_load(rules_file.read_text(encoding="utf-8"))
    return source, rules


def write(valuesets: dict[str, dict[str, Any]], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in set(path.name for path in out_dir.glob("*.json")) - set(valuesets):
        (out_dir / stale).unlink()
    for file_name, valueset in valuesets.items():
        (out_dir / file_name).write_text(render(valueset), encoding="utf-8")


def differences(valuesets: dict[str, dict[str, Any]], out_dir: Path) -> list[str]:
    present = {path.name: path for path in out_dir.glob("*.json")}
    problems = [f"unexpected file {name}" for name in sorted(set(present) - set(valuesets))]
    for file_name, valueset in valuesets.items():
        if file_name not in present:
            problems.append(f"missing file {file_name}")
        elif present[file_name].read_text(encoding="utf-8") != render(valueset):
            problems.append(f"{file_name} differs from the inputs")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=SOURCE_FILE)
    parser.add_argument("--rules", type=Path, default=RULES_FILE)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 on any difference")
    args = parser.parse_args(argv)
    valuesets = build(*load_inputs(args.source, args.rules))
    if args.check:
        problems = differences(valuesets, args.out)
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1 if problems else 0
    write(valuesets, args.out)
    print(f"wrote {len(valuesets)} value sets to {args.out}")
    return 0


# ---- one ValueSet ---------------------------------------------------------------------------------------


def _valueset(name, group, group_rules, patterns, name_rules, aliases, release, licensing) -> dict[str, Any]:
    vs_id = name.lower().replace("_", "-")
    title = group_rules.get("title") or _fail(f"{name}: no title in the rules file")
    extensions = [_group_extension(key, value) for key, value in group.items() if key != "codes"]
    for rule in name_rules:
        extensions.append({"url": EXT_NAME_MATCH, "extension": [
            *({"url": "name", "valueString": word} for word in rule["names"]),
            *({"url": "exclude-word", "valueString": word} for word in rule["exclude_words"]),
            *({"url": "site-name", "valueString": word} for word in rule.get("site_names", [])),
            *({"url": "site-word", "valueString": word} for word in rule.get("site_words", [])),
            *([{"url": "exclusions-stop-codes", "valueBoolean": True}] if rule.get("stop_codes") else []),
        ]})
    description = f"{title}. Role in the decision: {group['role']}."
    if group.get("note"):
        description += f" {_sentence(group['note'])}"
    if group.get("rule"):
        description += f" Rule: {_sentence(group['rule'])}"
    if patterns:
        description += " Beyond the enumerated codes, membership follows the ICD-10 hierarchy rules in compose (regex filters on the normalised code; excludes win)."
    if name_rules:
        description += " Concepts with unknown codes are matched by name (name-match extension)."
    valueset = {
        "resourceType": "ValueSet",
        "id": vs_id,
        "extension": extensions,
        "url": f"{release['canonical_base']}/ValueSet/{vs_id}",
        "version": release["version"],
        "name": name,
        "title": title,
        "status": "active",
        "date": release["date"],
        "publisher": release["publisher"],
        "description": description,
        "copyright": licensing,
        "compose": _compose(group["codes"], patterns, aliases),
        "expansion": _expansion(group["codes"], bool(patterns), release["expansion_timestamp"]),
    }
    return valueset


def _group_extension(key: str, value: Any) -> dict[str, Any]:
    url = EXT_GROUP_PREFIX + key.replace("_", "-")
    if isinstance(value, list):
        return {"url": url, "extension": [{"url": "item", "valueString": item} for item in value]}
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"group attribute {key}: unsupported value {value!r}")
    return {"url": url, "valueInteger" if isinstance(value, int) else "valueString": value}


def _compose(codes, patterns, aliases) -> dict[str, Any]:
    systems = list(dict.fromkeys([*(code["system"] for code in codes), *patterns]))
    include, exclude = [], []
    for system in systems:
        first = len(include)
        concepts = [{"code": code["code"], "display": code["display"]} for code in codes if code["system"] == system]
        if concepts:
            include.append({"system": system, "concept": concepts})
        for rule in patterns.get(system, {}).get("include", []):
            if "code" in rule:
                raise ValueError(f"{system}: add single codes with add_codes (with a display), not patterns")
            include.append(_filter_element(system, rule))
        if system_aliases := aliases.get(system):
            include[first] = {"extension": [{"url": EXT_SYSTEM_ALIAS, "valueUri": uri} for uri in system_aliases],
                              **include[first]}
        rules = patterns.get(system, {}).get("exclude", [])
        single = [rule for rule in rules if "code" in rule]
        if single:
            exclude.append({"system": system, "concept": [
                {"extension": [{"url": EXT_NOTE, "valueString": rule["note"]}], "code": rule["code"]} for rule in single
            ]})
        exclude.extend(_filter_element(system, rule) for rule in rules if "code" not in rule)
    return {"include": include, **({"exclude": exclude} if exclude else {})}


def _filter_element(system: str, rule: dict[str, Any]) -> dict[str, Any]:
    if ("prefix" in rule) == ("regex" in rule):
        raise ValueError(f"{system}: a pattern needs exactly one of prefix, regex, code: {rule}")
    regex = re.escape(rule["prefix"]) + ".*" if "prefix" in rule else rule["regex"]
    re.compile(regex)
    return {
        "extension": [{"url": EXT_NOTE, "valueString": rule["note"]}],
        "system": system,
        "filter": [{"property": "code", "op": "regex", "value": regex}],
    }


def _expansion(codes, unclosed: bool, timestamp: str) -> dict[str, Any]:
    contains = []
    for code in codes:
        entry = {"system": code["system"], "code": code["code"], "display": code["display"]}
        extensions = []
        for key, value in code.items():
            if key in ("system", "code", "display"):
                continue
            if key not in CODE_ATTRIBUTE_EXTENSIONS:
                raise ValueError(f"{code['code']}: unknown per-code attribute {key}")
            url, kind = CODE_ATTRIBUTE_EXTENSIONS[key]
            extensions.append({"url": url, kind: value})
        if extensions:
            entry["extension"] = extensions
        contains.append(entry)
    if unclosed:  # the ICD-10 rules admit codes that cannot be listed here; `total` would be a lie
        return {"extension": [{"url": UNCLOSED, "valueBoolean": True}], "timestamp": timestamp, "contains": contains}
    return {"timestamp": timestamp, "total": len(contains), "contains": contains}


def _check(name: str, codes: list[dict[str, Any]], patterns: dict[str, Any]) -> None:
    """Refuse contradictory or sloppy input: duplicates, unnormalised codes, enumerated codes that are excluded."""
    seen = set()
    for code in codes:
        key = (code["system"], code["code"])
        if key in seen:
            raise ValueError(f"{name}: {key} listed twice")
        seen.add(key)
        if normalise_code(code["system"], code["code"]) != code["code"]:
            raise ValueError(f"{name}: {key} is not in normalised form")
        if not code.get("display") or not code.get("src"):
            raise ValueError(f"{name}: {key} needs a display and a src")
        for rule in patterns.get(code["system"], {}).get("exclude", []):
            if rule.get("code") == code["code"] or (
                "code" not in rule
                and re.fullmatch(re.escape(rule["prefix"]) + ".*" if "prefix" in rule else rule["regex"], code["code"])
            ):
                raise ValueError(f"{name}: enumerated code {key} is excluded by {rule}")


def _system(systems: dict[str, str], key: str, group: str) -> str:
    if key not in systems:
        raise ValueError(f"{group}: unknown code system {key!r} (declare it under systems:)")
    return systems[key]


def _sentence(text: str) -> str:
    return text if text.endswith((".", "!", "?")) else text + "."


def _fail(message: str):
    raise ValueError(message)


if __name__ == "__main__":
    sys.exit(main())
