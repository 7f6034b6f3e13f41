"""Every study-config field carries its one-line doc as a pydantic description, so Prefect's
parameter form (and `model_json_schema`) shows it."""

from __future__ import annotations

import pytest

from sae_transfer import study

SECTIONS = [study.PairConfig, study.CorpusSection, study.SAESection, study.FinetuneSection, study.OutlierSection,
            study.EvalSection, study.InstructionSection, study.StudyConfig]


@pytest.mark.parametrize("section", SECTIONS, ids=lambda s: s.__name__)
def test_every_field_has_a_one_line_description(section):
    for name, field in section.model_fields.items():
        assert field.description, f"{section.__name__}.{name} has no description"
        assert "\n" not in field.description and len(field.description) > 10, f"{section.__name__}.{name}"


def test_prefect_parameter_form_shows_the_descriptions():
    from prefect.utilities.callables import parameter_schema

    from sae_transfer.flows.study import transfer_study

    definitions = parameter_schema(transfer_study.fn).model_dump()["definitions"]
    for section in SECTIONS:
        shown = definitions[section.__name__]["properties"]
        for name, field in section.model_fields.items():
            assert shown[name].get("description") == field.description, f"{section.__name__}.{name}"
