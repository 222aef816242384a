"""A synthetic corpus of short personal texts with known PII, for measuring what an attack gives back.

``data.name=pii`` (a built-in, made on the fly with the ``faker`` package, offline) yields rows
``{"text": ..., "entities": [{"type": ..., "text": ...}, ...]}``: e-mails, support tickets and bank notes
written from a few realistic templates, each with a name and some of an e-mail address, a phone number, a
street address and an account number (``ENTITY_TYPES``). ``entities`` lists every entity inserted into the
row, once, in the order it first appears.

Rows are generated one after another from a ``Faker`` seeded with the run's ``seed``, so a shorter corpus is
always a prefix of a longer one, and no entity of a row appears verbatim anywhere in a later row's text (a
row whose text would contain an earlier row's entity is drawn again). Hence, wherever ``data.max_rows`` cuts,
the rows past it (the attacker's public text, ``PublicKnowledge.aux_batches``) share no entity with the rows
the client trains on.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import Any

from splitlm.errors import DataError
from splitlm.files import write_jsonl

PII = "pii"
PII_ROWS = 2000  # rows made when data.max_rows is unset
ENTITY_TYPES = ("name", "email", "phone", "address", "account")
_PREFIX = 4  # every entity is at least this long; the earlier-entity index is keyed by its first characters

# Each template uses the fields it names; {first} is the person's first name (not an entity by itself: it is
# part of the name), {company} and {amount} are filler.
_TEMPLATES = (
    "From: {name} <{email}>\nSubject: change of address\n\nHello, please update my records: I have moved to "
    "{address}. You can reach me on {phone} if anything is missing.\nBest regards,\n{first}",
    "Support ticket: customer {name} ({email}) reports that the card linked to account {account} was declined "
    "twice today. Call back on {phone} before 5pm.",
    "Bank note: transfer of {amount} from account {account} held by {name}, {address}, flagged for review. "
    "Contact: {phone}.",
    "Hi {first},\n\nthanks for your order with {company}. We will ship it to {name}, {address} within three days "
    "and send tracking details to {email}.\n\nKind regards, customer care",
    "Ticket closed: {name} asked to change the phone number on account {account} to {phone}; identity "
    "confirmed by e-mail ({email}).",
    "Dear {name}, your new statement for account {account} is ready. If you did not request it, reply to this "
    "message or call us on {phone}.",
    "Delivery failed for {name} at {address}. The driver tried {phone} twice; reschedule at the depot or "
    "write to {email}.",
    "Meeting notes: {name} from {company} will send the signed form to {email} and wire {amount} to account "
    "{account} by Friday.",
)


@functools.lru_cache(maxsize=4)
def _generate(seed: int, rows: int) -> tuple[tuple[str, tuple[tuple[str, str], ...]], ...]:
    from faker import Faker

    fake = Faker("en_US")
    fake.seed_instance(seed)
    pick = random.Random(seed)
    earlier: dict[str, set[str]] = {}  # the first _PREFIX characters -> entities of the rows made so far
    made: list[tuple[str, tuple[tuple[str, str], ...]]] = []
    while len(made) < rows:
        text, entities = _row(fake, pick)
        if any(
            text.startswith(entity, i) for i in range(len(text)) for entity in earlier.get(text[i : i + _PREFIX], ())
        ):
            continue  # an earlier row's entity would appear in this one: draw again
        for _, value in entities:
            earlier.setdefault(value[:_PREFIX], set()).add(value)
        made.append((text, entities))
    return tuple(made)


def _row(fake: Any, pick: random.Random) -> tuple[str, tuple[tuple[str, str], ...]]:
    first, last = fake.first_name(), fake.last_name()
    user = pick.choice([f"{first}.{last}", f"{first[0]}{last}", f"{first}{last[0]}", f"{first}_{last}"]).lower()
    if pick.random() < 0.4:
        user += str(pick.randint(1, 99))
    domain = fake.free_email_domain() if pick.random() < 0.7 else fake.domain_name()
    values = {
        "name": f"{first} {last}",
        "email": f"{user}@{domain}",
        "phone": fake.numerify(pick.choice(["(%##) ###-####", "%##-###-####", "+1 %##-###-####"])),
        "address": f"{fake.street_address()}, {fake.city()}, {fake.state_abbr()} {fake.zipcode()}",
        "account": fake.numerify(pick.choice(["%#########", "%###########", "%### %### %###"])),
    }
    template = pick.choice(_TEMPLATES)
    filler = {
        "first": first,
        "company": fake.company(),
        "amount": f"${pick.randint(20, 9000):,}.{pick.randint(0, 99):02d}",
    }
    text = template.format(**values, **filler)
    entities = sorted(
        ((kind, value) for kind, value in values.items() if "{" + kind + "}" in template), key=lambda e: text.find(e[1])
    )
    return text, tuple(entities)


def pii_rows(rows: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The first ``rows`` rows (``PII_ROWS`` when ``None``) of the corpus made with ``seed``."""
    count = PII_ROWS if rows is None else rows
    if count < 1:
        raise DataError(f"the pii corpus needs at least 1 row, got {count}")
    return [
        {"text": text, "entities": [{"type": kind, "text": value} for kind, value in entities]}
        for text, entities in _generate(seed, count)
    ]


def row_entities(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Every distinct ``(type, text)`` entity listed in the rows' ``entities`` columns (rows without one add
    nothing), in order of first appearance."""
    seen: dict[tuple[str, str], None] = {}
    for row in rows:
        for entity in row.get("entities") or ():
            if isinstance(entity, dict) and isinstance(entity.get("type"), str) and isinstance(entity.get("text"), str):
                seen.setdefault((entity["type"], entity["text"]), None)
    return list(seen)


def write_pii(path: Path | str, rows: int, seed: int = 0) -> Path:
    """Write the first ``rows`` rows of the corpus made with ``seed`` to ``path`` as JSON lines (readable as
    ``data.name=PATH``; ``score`` reads its ``entities`` column too)."""
    path = Path(path)
    write_jsonl(path, pii_rows(rows, seed))
    return path
