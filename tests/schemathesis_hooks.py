"""Schemathesis' strategy for openapi.json's ``address`` format (``SCHEMATHESIS_HOOKS``, tests/test_openapi.py): text
with a visible character, as the server takes it (``dataset.is_blank``). The description says so in a sentence
for people; a regular expression of every invisible character would stand on the docs page instead."""
import schemathesis
from hypothesis import strategies as st

from mgeo_service.dataset import is_blank

schemathesis.openapi.format("address", st.text(min_size=1, max_size=1000).filter(lambda text: not is_blank(text)))
