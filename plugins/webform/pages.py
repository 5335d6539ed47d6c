"""HTML for the public form and the private status page: German by default, English on
request; every value escaped; labels, error texts tied to their fields, no JavaScript needed."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from html import escape
from typing import Any
from zoneinfo import ZoneInfo

from router.templates import repeated, utc_offset

from .fields import LIMITS

TEXT = {
    "de": {
        "title": "Kontakt",
        "intro": "Schreiben Sie uns – auch wenn Sie (noch) kein Kunde sind. Sie erhalten sofort eine Fallnummer und eine Antwort der zuständigen Stelle.",
        "name": "Name",
        "email": "E-Mail (optional)",
        "phone": "Telefon (optional)",
        "street": "Straße und Hausnummer",
        "postcode": "Postleitzahl",
        "city": "Ort",
        "customer_number": "Kundennummer (falls vorhanden)",
        "topic": "Thema",
        "message": "Ihre Nachricht",
        "send": "Absenden",
        "errors": "Bitte prüfen Sie die markierten Felder.",
        "unavailable": "Wir können Ihre Nachricht gerade nicht speichern. Ihre Eingaben sind erhalten: bitte senden Sie sie in ein paar Minuten noch einmal.",
        "token_expired": "Das Formular war zu lange geöffnet. Ihre Eingaben sind erhalten: bitte senden Sie es noch einmal.",
        "too_fast": "Das ging zu schnell. Ihre Eingaben sind erhalten: bitte warten Sie einen Moment und senden Sie es dann noch einmal.",
        "invalid_token": "Das Formular ließ sich nicht prüfen. Ihre Eingaben sind erhalten: bitte senden Sie es noch einmal.",
        "rate_limited": "Von Ihrem Anschluss kamen gerade sehr viele Nachrichten. Ihre Eingaben sind erhalten: bitte senden Sie sie in einer Minute noch einmal.",
        "unknown_charset": "Ihr Browser hat das Formular in einer unbekannten Zeichenkodierung ({charset}) geschickt. Bitte prüfen Sie Ihre Eingaben und senden Sie sie noch einmal.",
        "invalid_encoding": "Ihre Eingaben passen nicht zu der Zeichenkodierung, die Ihr Browser angegeben hat ({charset}). Bitte prüfen Sie sie und senden Sie sie noch einmal.",
        "choose": "– bitte wählen –",
        "status_title": "Ihr Anliegen {case}",
        "responsible": "Zuständig",
        "deadline": "Antwort bis",
        "state": "Stand",
        "you": "Sie",
        "us": "Antwort",
        "reply": "Antworten",
        "reply_send": "Nachricht senden",
        "not_found": "Diese Seite gibt es nicht (mehr).",
        "states": {"open": "eingegangen", "acknowledged": "in Bearbeitung", "answered": "beantwortet",
                   "waiting": "wartet auf Ihre Rückmeldung", "closed": "abgeschlossen"},
        "keep_link": "Bewahren Sie den Link zu dieser Seite auf: nur damit sehen Sie Ihr Anliegen.",
        "other_language": ("English", "en"),
    },
    "en": {
        "title": "Contact",
        "intro": "Write to us – also if you are not a customer (yet). You get a case reference at once and an answer from the unit responsible.",
        "name": "Name",
        "email": "E-mail (optional)",
        "phone": "Phone (optional)",
        "street": "Street and number",
        "postcode": "Postcode",
        "city": "City",
        "customer_number": "Customer number (if you have one)",
        "topic": "Topic",
        "message": "Your message",
        "send": "Send",
        "errors": "Please check the marked fields.",
        "unavailable": "We cannot store your message right now. What you entered is kept: please send it again in a few minutes.",
        "token_expired": "The form was open too long. What you entered is kept: please send it again.",
        "too_fast": "That was too quick. What you entered is kept: please wait a moment, then send it again.",
        "invalid_token": "The form could not be verified. What you entered is kept: please send it again.",
        "rate_limited": "Very many messages came from your connection just now. What you entered is kept: please send it again in a minute.",
        "unknown_charset": "Your browser sent the form in an unknown character encoding ({charset}). Please check what you entered and send it again.",
        "invalid_encoding": "What you entered does not match the character encoding your browser named ({charset}). Please check it and send it again.",
        "choose": "– please choose –",
        "status_title": "Your case {case}",
        "responsible": "Responsible",
        "deadline": "Answer by",
        "state": "Status",
        "you": "You",
        "us": "Answer",
        "reply": "Reply",
        "reply_send": "Send message",
        "not_found": "This page does not exist (any more).",
        "states": {"open": "received", "acknowledged": "in progress", "answered": "answered",
                   "waiting": "waiting for your reply", "closed": "closed"},
        "keep_link": "Keep the link to this page: it is the only way to see your case.",
        "other_language": ("Deutsch", "de"),
    },
}

STYLE = """body{font-family:system-ui,sans-serif;max-width:42rem;margin:2rem auto;padding:0 1rem;line-height:1.5;color:#1a1a1a}
label{display:block;margin-top:1rem;font-weight:600}input,select,textarea{width:100%;padding:.5rem;font:inherit;box-sizing:border-box}
textarea{min-height:8rem}.error{color:#a00000;font-weight:normal}.hp{position:absolute;left:-10000px}
button{margin-top:1.5rem;padding:.6rem 1.4rem;font:inherit}.msg{border-left:4px solid #999;padding:.3rem .8rem;margin:1rem 0;white-space:pre-wrap}
.msg.out{border-color:#0a5}dl{display:grid;grid-template-columns:max-content auto;gap:.2rem 1rem}"""


def _page(language: str, title: str, body: str) -> str:
    return (
        f'<!doctype html>\n<html lang="{escape(language)}"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body><main>{body}</main></body></html>"
    )


def _field(name: str, label: str, value: str, error: str | None, *, kind: str = "text", required: bool = False,
            autocomplete: str | None = None) -> str:
    """One labelled input, its error tied to it, and the browser told the server's length limit
    (``fields.LIMITS``) so nothing longer is typed in the first place."""
    err_id = f"{name}-error"
    attrs = f' id="{name}" name="{name}" value="{escape(value)}" type="{kind}" maxlength="{LIMITS[name]}"'
    if required:
        attrs += " required"
    if autocomplete:
        attrs += f' autocomplete="{autocomplete}"'
    if error:
        attrs += f' aria-invalid="true" aria-describedby="{err_id}"'
    err = f' <span class="error" id="{err_id}">{escape(error)}</span>' if error else ""
    return f'<label for="{name}">{escape(label)}{err}</label><input{attrs}>'


def form_page(
    *, language: str, token: str, topics: Mapping[str, Mapping[str, str]], values: Mapping[str, str] | None = None,
    errors: Mapping[str, str] | None = None, action: str = "/channels/webform/", notice: str | None = None,
) -> str:
    """The contact form, filled with ``values``; ``errors`` by field, ``notice`` for the whole form."""
    t = TEXT[language]
    values = values or {}
    errors = errors or {}
    other_name, other_code = t["other_language"]
    parts = [
        f'<p><a href="?lang={other_code}" hreflang="{other_code}" lang="{other_code}">{other_name}</a></p>',
        f"<h1>{escape(t['title'])}</h1><p>{escape(t['intro'])}</p>",
    ]
    if errors:
        parts.append(f'<p class="error" role="alert">{escape(t["errors"])}</p>')
    if notice:
        parts.append(f'<p class="error" role="alert">{escape(notice)}</p>')
    parts.append(f'<form method="post" action="{escape(action)}?lang={language}" accept-charset="utf-8">')
    parts.append(f'<input type="hidden" name="form_token" value="{escape(token)}">')
    parts.append(_field("name", t["name"], values.get("name", ""), errors.get("name"), autocomplete="name"))
    parts.append(_field("email", t["email"], values.get("email", ""), errors.get("email"), kind="email", autocomplete="email"))
    parts.append(_field("phone", t["phone"], values.get("phone", ""), errors.get("phone"), kind="tel", autocomplete="tel"))
    parts.append(_field("street", t["street"], values.get("street", ""), errors.get("street"), autocomplete="street-address"))
    parts.append(_field("postcode", t["postcode"], values.get("postcode", ""), errors.get("postcode"), autocomplete="postal-code"))
    parts.append(_field("city", t["city"], values.get("city", ""), errors.get("city"), autocomplete="address-level2"))
    parts.append(_field("customer_number", t["customer_number"], values.get("customer_number", ""), errors.get("customer_number")))
    topic_err = errors.get("topic")
    # An empty first choice, so ``required`` makes the resident pick one: with the first topic
    # preselected, a question about a contract went out as a construction case.
    options = f'<option value=""{"" if values.get("topic") in topics else " selected"}>{escape(t["choose"])}</option>'
    options += "".join(
        f'<option value="{escape(tid)}"{" selected" if values.get("topic") == tid else ""}>{escape(names.get(language) or names.get("de") or tid)}</option>'
        for tid, names in topics.items()
    )
    parts.append(
        f'<label for="topic">{escape(t["topic"])}'
        + (f' <span class="error" id="topic-error">{escape(topic_err)}</span>' if topic_err else "")
        + '</label><select id="topic" name="topic" required'
        + (' aria-invalid="true" aria-describedby="topic-error"' if topic_err else "")
        + f">{options}</select>"
    )
    msg_err = errors.get("message")
    parts.append(
        f'<label for="message">{escape(t["message"])}'
        + (f' <span class="error" id="message-error">{escape(msg_err)}</span>' if msg_err else "")
        + f'</label><textarea id="message" name="message" required maxlength="{LIMITS["message"]}"'
        + (' aria-invalid="true" aria-describedby="message-error"' if msg_err else "")
        + f">{escape(values.get('message', ''))}</textarea>"
    )
    parts.append('<div class="hp" aria-hidden="true"><label for="website">Website</label>'
                 '<input id="website" name="website" type="text" tabindex="-1" autocomplete="off"></div>')
    parts.append(f'<button type="submit">{escape(t["send"])}</button></form>')
    return _page(language, t["title"], "".join(parts))


def _when(value: datetime | None, language: str, timezone: str) -> str:
    if value is None:
        return "–"
    local = value.astimezone(ZoneInfo(timezone))
    # In the hour the clocks go back, the same wall-clock time names two moments: with its offset,
    # as the acknowledgement writes it.
    suffix = f" ({utc_offset(local)})" if repeated(local) else ""
    return f"{local:%d.%m.%Y, %H:%M} Uhr{suffix}" if language == "de" else f"{local:%d %b %Y, %H:%M}{suffix}"


def status_page(
    *, language: str, view: Mapping[str, Any], token: str, timezone: str, action: str, error: str | None = None,
    text: str = "",
) -> str:
    t = TEXT[language]
    title = t["status_title"].format(case=view["case_reference"])
    parts = [f"<h1>{escape(title)}</h1>", "<dl>",
             f"<dt>{escape(t['state'])}</dt><dd>{escape(t['states'].get(view['state'], view['state']))}</dd>",
             f"<dt>{escape(t['responsible'])}</dt><dd>{escape(view['unit_name'])}</dd>"]
    if view.get("deadline") and view["state"] in ("open", "acknowledged"):
        parts.append(f"<dt>{escape(t['deadline'])}</dt><dd>{escape(_when(view['deadline'], language, timezone))}</dd>")
    parts.append("</dl>")
    parts.append(f"<p>{escape(t['keep_link'])}</p>")
    for m in view["messages"]:
        who = t["you"] if m["direction"] == "in" else t["us"]
        parts.append(
            f'<div class="msg {escape(m["direction"])}"><strong>{escape(who)}</strong>, '
            f"{escape(_when(m['created_at'], language, timezone))}<br>{escape(m['text'] or '')}</div>"
        )
    parts.append(f"<h2>{escape(t['reply'])}</h2>")
    if error:
        parts.append(f'<p class="error" role="alert" id="message-error">{escape(error)}</p>')
    parts.append(
        f'<form method="post" action="{escape(action)}?lang={language}" accept-charset="utf-8">'
        f'<input type="hidden" name="form_token" value="{escape(token)}">'
        f'<label for="message">{escape(t["message"])}</label>'
        f'<textarea id="message" name="message" required maxlength="{LIMITS["message"]}"'
        + (' aria-invalid="true" aria-describedby="message-error"' if error else "")
        + f">{escape(text)}</textarea>"
        '<div class="hp" aria-hidden="true"><label for="website">Website</label>'
        '<input id="website" name="website" type="text" tabindex="-1" autocomplete="off"></div>'
        f'<button type="submit">{escape(t["reply_send"])}</button></form>'
    )
    return _page(language, title, "".join(parts))


def not_found_page(language: str) -> str:
    t = TEXT[language]
    return _page(language, t["not_found"], f"<h1>{escape(t['not_found'])}</h1>")
