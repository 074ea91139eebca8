"""The page's stylesheet and keyboard shortcuts (kept in Python so packaging needs no data files)."""

CSS = """
#pf-key, #pf1-key { display: none !important; }
.pf-header { align-items: center; }
.pf-brand { font-weight: 700; font-size: 1.35em; letter-spacing: .02em; }
#pf-who { text-align: right; color: var(--body-text-color-subdued); }
.pf-screen { display: flex; flex-direction: column; gap: 10px; }
.pf-card { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 10px 16px;
           background: var(--background-fill-secondary); overflow-wrap: anywhere; }
.pf-card.pf-prompt { max-height: 32vh; overflow-y: auto; }
.pf-card.pf-response { min-height: 180px; max-height: 56vh; overflow-y: auto; background: var(--background-fill-primary); }
.pf-card pre { white-space: pre-wrap; word-break: break-word; background: var(--background-fill-secondary);
               padding: 8px; border-radius: 6px; }
.pf-card p { margin: .35em 0; }
.pf-sides { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; }
@media (max-width: 760px) { .pf-sides { grid-template-columns: 1fr; } }
.pf-turn + .pf-turn { margin-top: .5em; }
.pf-role { font-size: .72em; text-transform: uppercase; letter-spacing: .06em; font-weight: 600;
           color: var(--body-text-color-subdued); }
h4.pf-side-title { margin: 4px 0 4px 2px !important; font-weight: 600; }
.pf-topbar { align-items: center; min-height: 36px; }
.pf-choices button { min-height: 46px; font-size: 1.02em; }
/* What shows follows from the screen's own markup, so events never send layout updates. */
.pf-when-failed, .pf-when-empty { display: none !important; }
#pf-annotate:has(#pf-status .pf-failed) .pf-when-failed,
#pf-single:has(#pf1-status .pf-failed) .pf-when-failed,
#pf-annotate:has(#pf-screen .pf-nothing) .pf-when-empty,
#pf-single:has(#pf1-screen .pf-nothing) .pf-when-empty { display: inline-flex !important; }
#pf-annotate:has(#pf-screen .pf-nothing) .pf-when-pair,
#pf-single:has(#pf1-screen .pf-nothing) .pf-when-pair { display: none !important; }
.pf-status { padding: 6px 12px; border-radius: 6px; font-weight: 500; }
.pf-ok { background: #dcfce7; color: #166534; }
.pf-info { background: #e0e7ff; color: #3730a3; }
.pf-warn { background: #fef9c3; color: #854d0e; }
.pf-error { background: #fee2e2; color: #991b1b; }
.pf-empty { text-align: center; padding: 48px 16px; border: 2px dashed var(--border-color-primary);
            border-radius: 12px; color: var(--body-text-color-subdued); }
.pf-empty-title { font-size: 1.3em; font-weight: 600; color: var(--body-text-color); margin-bottom: 6px; }
.pf-bar { position: relative; height: 18px; border-radius: 9px; background: var(--background-fill-secondary);
          border: 1px solid var(--border-color-primary); overflow: hidden; }
.pf-bar-fill { height: 100%; background: #4f46e5; transition: width .4s; }
.pf-bar-unknown { width: 100%; opacity: .15; }
.pf-bar span { position: absolute; inset: 0; text-align: center; font-size: 12px; line-height: 18px; }
"""

# Number keys for the pairwise choices, U/D for thumbs, S to skip. Only the visible button
# of the open tab answers, and never while the annotator is typing in a text field.
KEYS_JS = """
(() => {
  if (window.__prefloopKeys) return;
  window.__prefloopKeys = true;
  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
    const target = event.target;
    const typing = target && (target.isContentEditable || target.tagName === "TEXTAREA" || target.tagName === "SELECT"
      || (target.tagName === "INPUT" && !["radio", "checkbox", "button"].includes(target.type)));
    if (typing) return;
    const key = (event.key || "").toLowerCase();
    if (!/^[a-z0-9]$/.test(key)) return;
    for (const element of document.querySelectorAll(".pf-key-" + key)) {
      const button = element.tagName === "BUTTON" ? element : element.querySelector("button");
      if (button && button.offsetParent !== null && !button.disabled) {
        event.preventDefault();
        button.click();
        return;
      }
    }
  });
})();
"""


def theme():
    """Gradio's default look with system fonts: the page never fetches a web font."""
    import gradio as gr

    return gr.themes.Default(
        primary_hue="indigo",
        font=[
            "ui-sans-serif",
            "system-ui",
            "-apple-system",
            "Segoe UI",
            "Roboto",
            "Helvetica",
            "Arial",
            "sans-serif",
        ],
        font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"],
    )
