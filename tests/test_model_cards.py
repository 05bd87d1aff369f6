"""Every registered model has a row in its family's model card, with the measured parameter count."""
import re
import sys
from pathlib import Path

import pytest

import visionattn
from layouts import num_params
from official_checks import meta_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools'))
import model_cards  # noqa: E402

FAMILIES = model_cards.family_models()


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_card_lists_every_model(family):
    path = ROOT / 'model_cards' / f'{family}.md'
    assert path.exists(), f'{path} missing: run python tools/model_cards.py'
    text = path.read_text()
    for name in FAMILIES[family]:
        row = re.search(rf'^\| `{name}` \| ([\d,]+) \|', text, re.M)
        assert row, f'{name} is registered but missing from {path.name}: run python tools/model_cards.py'
        assert int(row.group(1).replace(',', '')) == num_params(meta_model(name)), f'{name}: stale parameter count'


def test_every_family_has_card_metadata():
    for family in FAMILIES:
        card = __import__(f'visionattn.models.{family}', fromlist=['FAMILY_CARD']).FAMILY_CARD
        for key in ('name', 'paper', 'repo', 'license', 'load_official'):
            assert card.get(key), f'{family}.FAMILY_CARD lacks {key!r}'
    assert visionattn.list_models()
