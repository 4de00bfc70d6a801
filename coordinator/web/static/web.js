// Sagaplane's operator page: live updates and the confirm dialogs. Plain JavaScript,
// no dependencies; the server renders every piece of HTML this script puts in place.
"use strict";

(function () {
  const LIST_REFRESH_MS = 3000;
  // The list: its counts and table are read again every few seconds while the tab is
  // shown (each read is seven ListSagas calls: a hidden tab costs the coordinator nothing).
  const live = document.getElementById("live");
  if (live && live.dataset.liveSrc) {
    const refresh = async () => {
      if (document.visibilityState === "visible") {
        try {
          const answer = await fetch(live.dataset.liveSrc, { headers: { Accept: "text/html" } });
          if (answer.ok) live.innerHTML = await answer.text();
        } catch (err) {
          // The coordinator is restarting: the next round tries again.
        }
      }
      setTimeout(refresh, LIST_REFRESH_MS);
    };
    setTimeout(refresh, LIST_REFRESH_MS);
  }

  // One saga: its sections are sent again (server-sent events over WatchSaga) after
  // each transition; the stream ends with the saga.
  const saga = document.getElementById("saga");
  const status = (text) => {
    const shown = document.querySelector("[data-live-status]");
    if (shown) shown.textContent = text;
  };
  if (saga && saga.dataset.events && window.EventSource) {
    const events = new EventSource(saga.dataset.events);
    events.addEventListener("saga", (message) => {
      const update = JSON.parse(message.data);
      for (const [id, html] of Object.entries(update.sections)) {
        const section = document.getElementById(id);
        if (section) section.innerHTML = html;
      }
      saga.dataset.state = update.state;
      status("live");
    });
    events.addEventListener("end", () => {
      events.close();
      status("ended");
    });
    events.addEventListener("failure", (message) => {
      status("reconnecting: " + JSON.parse(message.data).error);
    });
    events.addEventListener("error", () => status("reconnecting…"));
  }

  // The buttons open a dialog; only its confirm button acts.
  document.addEventListener("click", async (event) => {
    const opener = event.target.closest("[data-open]");
    if (opener) {
      const dialog = document.getElementById(opener.dataset.open);
      dialog.querySelector("[data-error]").textContent = "";
      dialog.showModal();
      return;
    }
    const confirm = event.target.closest("dialog [data-confirm]");
    if (!confirm) return;
    event.preventDefault();
    const dialog = confirm.closest("dialog");
    const form = confirm.closest("form");
    if (!form.reportValidity()) return;
    const body = Object.fromEntries(new FormData(form).entries());
    confirm.disabled = true;
    try {
      const answer = await fetch(dialog.dataset.post, {
        method: "POST",
        headers: { "Content-Type": "application/json", "X-Sagaplane-Request": "1" },
        body: JSON.stringify(body),
      });
      if (answer.ok) {
        dialog.close();
      } else {
        const refusal = await answer.json().catch(() => ({ error: answer.statusText }));
        dialog.querySelector("[data-error]").textContent = refusal.error;
      }
    } catch (err) {
      dialog.querySelector("[data-error]").textContent = String(err);
    } finally {
      confirm.disabled = false;
    }
  });
})();
