"""The DP coordinator process, modelled on vLLM's ``DPCoordinatorProc`` wave handling.

It tracks the global wave and running state from rank 0's ``wave_complete`` and the ranks'
``start_wave`` notices, and broadcasts ``START_DP_WAVE`` to wake idle engines when a client
sends a first request while the engines are idle. As in vLLM, a first request for a stale wave
is broadcast to every engine, and sending ``START_DP_WAVE`` is not taken as evidence that the
engines run (a paused engine discards it).
"""

from __future__ import annotations

import queue

from instrumented_core.cluster import messages as msg


def coordinator_main(inbox, rank_inboxes, client_outbox) -> None:
    current_wave = 0
    engines_running = False

    def broadcast(wave: int, exclude, inject_id: int | None = None) -> None:
        for rank_inbox in rank_inboxes:
            rank_inbox.put((msg.START_DP_WAVE, wave, exclude, inject_id))

    def publish() -> None:
        client_outbox.put((msg.WAVE_STATE, current_wave, engines_running))

    while True:
        try:
            message = inbox.get(timeout=1.0)
        except queue.Empty:
            continue
        kind = message[0]
        if kind == msg.SHUTDOWN:
            return
        if kind == msg.FIRST_REQ:
            _, exclude, wave = message
            if not engines_running:
                if wave < current_wave:
                    exclude = None
                broadcast(current_wave, exclude)
        elif kind == msg.INJECT_START_DP_WAVE:
            _, wave, exclude, inject_id = message
            broadcast(current_wave if wave is None else wave, exclude, inject_id)
        elif kind == msg.WAVE_COMPLETE:
            (_, wave) = message
            if current_wave <= wave:
                current_wave, engines_running = wave + 1, False
                publish()
        elif kind == msg.START_WAVE:
            _, wave, engine_index = message
            if wave > current_wave or (wave == current_wave and not engines_running):
                current_wave, engines_running = wave, True
                publish()
                broadcast(wave, engine_index)
