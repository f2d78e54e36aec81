"""The report's flight-recorder section: the cross-rank analysis of the run's hang dumps.

Why here too: a run that hung leaves each stuck rank's dump in ``flight/`` of the output
directory; the page shows the same verdict ``instrumented-core analyze`` prints (first
divergent DP collective, cause, culprits, victims, each rank's last events), so the report
explains the hang without a second tool. No dump: one line saying so.
"""

from __future__ import annotations

from pathlib import Path

from instrumented_core.report.theme import esc
from instrumented_core.run_files import FLIGHT_DIR

__all__ = ["flight_section"]


def flight_section(out_dir: Path) -> str:
    from instrumented_core.flight_analysis import FlightInputError, analyze, load_dumps

    head = ('<h2 id="flight">Flight recorder: cross-rank analysis of the hang dumps</h2>')
    directory = Path(out_dir) / FLIGHT_DIR
    if not directory.is_dir() or not any(directory.glob("flight-rank*.json")):
        return head + ('<p class="note">No hang dumps: no rank was inside a collective, or '
                       "busy without progress, past its watchdog threshold.</p>")
    try:
        result = analyze(load_dumps(directory))
    except (FlightInputError, OSError, KeyError, ValueError, TypeError) as e:
        return head + f'<p class="note">hang dumps unreadable: {esc(str(e))}</p>'
    facts = [("first divergence", result.divergence
              or "none (the ranks' DP collective sequences agree)")]
    if result.cause:
        facts.append(("cause", result.cause))
    facts.append(("culprit", ", ".join(map(str, result.culprits)) or "none named"))
    facts.append(("victims", ", ".join(map(str, result.victims)) or "none"))
    if result.missing:
        facts.append(("no dump from", ", ".join(map(str, result.missing))))
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in facts)
    return (head + f'<table class="flight" id="flight-verdict">{rows}</table>'
            + '<p class="note">The same text as <code>instrumented-core analyze '
            + esc(str(directory)) + "</code>:</p>"
            + f'<pre id="flight-analysis">{esc(result.render())}</pre>')
