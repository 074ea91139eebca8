"""Model text and admin guidelines to safe HTML.

Responses are untrusted: a model can emit `<script>`, `<img onerror=...>` or a
`javascript:` link, and annotators must see such output as the text it is, not run it.
So raw HTML is never passed through: markdown-it escapes it (html=False) and refuses unsafe
link schemes, and nh3 then keeps only an allowlist of tags, attributes and URL schemes as a
second, independent barrier. Images are dropped: an <img> would fetch from anywhere the
model names, leaking that an annotator is looking.
"""

from __future__ import annotations

import html
from functools import lru_cache

import nh3
from markdown_it import MarkdownIt

# fmt: off
_TAGS = {
    "p", "br", "hr", "pre", "code", "blockquote", "strong", "em", "b", "i", "s", "del", "ins",
    "sub", "sup", "kbd", "ul", "ol", "li", "h1", "h2", "h3", "h4", "h5", "h6", "a",
    "table", "thead", "tbody", "tr", "th", "td", "span", "div",
}
# fmt: on
_ATTRIBUTES = {
    "a": {"href", "title"},
    "th": {"align"},
    "td": {"align"},
    "ol": {"start"},
    "code": {"class"},
}
_URL_SCHEMES = {"http", "https", "mailto"}


def _image_as_text(_renderer, tokens, idx, _options, _env) -> str:
    token = tokens[idx]
    alt = "".join(child.content for child in token.children or [])
    return html.escape(f"![{alt}]({token.attrGet('src') or ''})")


@lru_cache(maxsize=1)
def _markdown() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False, "linkify": False}).enable(
        ["table", "strikethrough"]
    )
    md.add_render_rule("image", _image_as_text)
    return md


def sanitize(fragment: str) -> str:
    return nh3.clean(
        fragment,
        tags=_TAGS,
        attributes=_ATTRIBUTES,
        url_schemes=_URL_SCHEMES,
        link_rel="noopener noreferrer nofollow",
        strip_comments=True,
    )


def render_markdown(text: str | None) -> str:
    """Markdown to HTML that is safe to insert into the page."""
    return sanitize(_markdown().render(text or ""))


def render_messages(messages: list[dict]) -> str:
    """A chat prompt: each turn under its role, the last user turn being what is answered."""
    parts = []
    for message in messages:
        role = html.escape(str(message.get("role", "")))
        body = render_markdown(str(message.get("content", "")))
        parts.append(
            f'<div class="pf-turn pf-{role}"><div class="pf-role">{role}</div>{body}</div>'
        )
    return "\n".join(parts)
